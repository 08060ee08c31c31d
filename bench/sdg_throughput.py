"""SDG generation throughput, as ratios against a baseline run in the same process.

    python bench/sdg_throughput.py [--prompts 32] [--new-tokens 32] [--out bench/results/sdg_throughput.json]

1. In-process batching: records/s of ``LocalGenerator`` at batch_size 1 (baseline) and
   batch_size 16, on an untrained ``tiny`` Nemotron-H (6M parameters; speed does not
   depend on the weights) with greedy decoding of ``--new-tokens`` tokens.
2. Endpoint concurrency: records/s of ``EndpointGenerator`` at max_concurrency 1 (baseline)
   and 8 against a local OpenAI-compatible server that answers each request after a fixed
   latency (100 ms, a remote model's time per request): the client, not the model, is
   measured, so the ideal speedup is 8. The server runs in a process of its own.
3. Resume bookkeeping: seconds per record kept in the shards (append + flush, fsync at
   most once a second) against writing the same JSON lines to a plain file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.architectures import build_model_config, get_family  # noqa: E402
from model.spec import ModelSpec  # noqa: E402
from model.tokenizer import train_bpe  # noqa: E402
from sdg.backends import ChatRequest, EndpointGenerator, LocalGenerator  # noqa: E402
from sdg.shards import RecordShards, record_key  # noqa: E402


def tiny_checkpoint(folder: Path) -> Path:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokenizer = train_bpe((p.read_text() for p in sorted(stdlib.glob("[a-m]*.py"))[:60]), 4096)
    torch.manual_seed(0)
    model = get_family("nemotron_h").model_class(build_model_config(ModelSpec(preset="tiny"), tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def requests(n: int, new_tokens: int) -> list[ChatRequest]:
    topics = ["rivers", "prime numbers", "unicode", "file systems", "regular expressions", "sorting", "volcanoes"]
    return [ChatRequest(messages=[{"role": "user", "content": f"Write a question about {topics[i % len(topics)]} "
                                                              f"number {i}."}],
                        max_new_tokens=new_tokens, temperature=0) for i in range(n)]


def rate(generator, reqs) -> float:
    start = time.perf_counter()
    results = dict(generator.generate_iter(reqs))
    assert len(results) == len(reqs)
    return len(reqs) / (time.perf_counter() - start)


FIXED_LATENCY_SERVER = """
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(float(sys.argv[2]))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "A question?"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def fixed_latency_server(latency_s: float) -> tuple[subprocess.Popen, str]:
    """A server answering every chat completion after ``latency_s``, in its own process
    (so it does not share this process's interpreter lock with the client)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-c", FIXED_LATENCY_SERVER, str(port), str(latency_s)])
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    return process, f"http://127.0.0.1:{port}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--endpoint-requests", type=int, default=48)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--out", default="bench/results/sdg_throughput.json")
    args = parser.parse_args()
    results = {"torch_threads": torch.get_num_threads(), "prompts": args.prompts, "new_tokens": args.new_tokens}

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_checkpoint(Path(tmp) / "tiny")
        reqs = requests(args.prompts, args.new_tokens)
        generator = LocalGenerator(folder, batch_size=1)
        rate(generator, reqs[:2])  # warm-up
        per_batch = {}
        for batch_size in (1, 16):
            generator.batch_size = batch_size
            per_batch[batch_size] = rate(generator, reqs)
            print(f"in-process batch {batch_size:>2}: {per_batch[batch_size]:.2f} records/s", flush=True)
        results["local_records_per_s"] = per_batch
        results["local_batch16_speedup"] = per_batch[16] / per_batch[1]

        server, url = fixed_latency_server(args.latency)
        per_concurrency = {}
        for concurrency in (1, 8):
            endpoint = EndpointGenerator(url, model="fixed", max_concurrency=concurrency)
            per_concurrency[concurrency] = rate(endpoint, requests(args.endpoint_requests, 8))
            endpoint.close()
            print(f"endpoint concurrency {concurrency}: {per_concurrency[concurrency]:.1f} records/s "
                  f"({args.latency * 1000:.0f} ms per request)", flush=True)
        server.terminate()
        server.wait()
        results["endpoint_records_per_s"] = per_concurrency
        results["endpoint_concurrency8_speedup"] = per_concurrency[8] / per_concurrency[1]

        n = 5000
        values = [(record_key("responses", i), f"response text number {i} " * 8) for i in range(n)]
        start = time.perf_counter()
        with open(Path(tmp) / "plain.jsonl", "w") as f:
            for key, value in values:
                f.write(json.dumps({"key": key, "value": value}) + "\n")
        plain = (time.perf_counter() - start) / n
        shards = RecordShards(Path(tmp) / "shards")
        start = time.perf_counter()
        for key, value in values:
            shards.append(key, value)
        shards.close()
        kept = (time.perf_counter() - start) / n
        results["shard_us_per_record"] = kept * 1e6
        results["plain_write_us_per_record"] = plain * 1e6
        print(f"shards: {kept * 1e6:.1f} us per record kept (plain file write: {plain * 1e6:.1f} us)")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if "speedup" in k}, indent=1))


if __name__ == "__main__":
    main()
