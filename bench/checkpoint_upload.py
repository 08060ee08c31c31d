"""What publishing checkpoints to S3 in the background costs a training loop.

    python bench/checkpoint_upload.py [--preset tiny] [--steps 30] [--checkpoint-every 5] [--rounds 2]

The factory's training loop (model/train.py) on the built-in corpus, saving a checkpoint every
``--checkpoint-every`` steps, run with and without ``S3Store.mirror_checkpoints`` (each sealed
checkpoint uploaded by a background thread, manifest last, the newest two kept) against a moto
S3 server started here on 127.0.0.1. Both variants run in this process, interleaved over
``--rounds`` rounds, from an empty checkpoint folder each time; the figure is the ratio of
their training throughputs (tokens per second over the whole run, checkpoint writes included
in both). On this machine the S3 server shares the same 2 cores, so every byte it receives
is CPU taken from training: a worst case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registry_transfer import start_moto  # noqa: E402
from train_throughput import training_setup  # noqa: E402
from transformers import NemotronHForCausalLM  # noqa: E402

from model.checkpoint import list_checkpoints  # noqa: E402
from model.train import train  # noqa: E402
from store.s3 import S3Store  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_upload.json"


def run_once(config, data, spec, work: Path, store: S3Store | None) -> dict:
    """One training run from scratch; its tokens/s over the whole run and the checkpoints published."""
    torch.manual_seed(0)
    net = NemotronHForCausalLM(config)
    started = time.perf_counter()
    if store is None:
        train(net, data, spec, work, description="local only")
        uploads = 0
    else:
        with store.mirror_checkpoints(work / "checkpoints", keep=spec.keep_checkpoints) as mirror:
            train(net, data, spec, work, description="with upload")
        uploads = mirror.uploads
    seconds = time.perf_counter() - started
    checkpoint_bytes = sum(f.stat().st_size for f in list_checkpoints(work / "checkpoints")[-1].rglob("*") if f.is_file())
    return {"tokens_per_s": spec.steps * spec.batch_size * data.seq_len / seconds, "seconds": seconds,
            "uploads": uploads, "checkpoint_mib": checkpoint_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    server, endpoint = start_moto()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    scratch = Path(tempfile.mkdtemp(prefix="checkpoint-upload-"))
    os.environ["FACTORY_WORK_DIR"] = str(scratch / "work")
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        store = S3Store("s3://bench/factory")
        data, config, spec = training_setup(args.preset, args.steps)
        spec = spec.model_copy(update={"checkpoint_every": args.checkpoint_every, "keep_checkpoints": 2})
        runs = {"local": [], "upload": []}
        for round_ in range(args.rounds):
            order = ("local", "upload") if round_ % 2 == 0 else ("upload", "local")
            for variant in order:
                work = store.stage_dir("pretrain", f"round-{round_}-{variant}")  # a fresh prefix: nothing to resume
                result = run_once(config, data, spec, work, store if variant == "upload" else None)
                runs[variant].append(result)
                print(f"round {round_ + 1} {variant:>6}: {result['tokens_per_s']:.0f} tokens/s, "
                      f"{result['uploads']} checkpoints of {result['checkpoint_mib']:.1f} MiB published", flush=True)
        local = statistics.median(r["tokens_per_s"] for r in runs["local"])
        upload = statistics.median(r["tokens_per_s"] for r in runs["upload"])
        summary = {"local_tokens_per_s": local, "upload_tokens_per_s": upload, "ratio": upload / local,
                   "cost_percent": 100 * (1 - upload / local)}
        print(f"with background upload: {upload:.0f} vs {local:.0f} tokens/s, ratio {upload / local:.3f} "
              f"({summary['cost_percent']:.1f}% slower)")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs,
                                       "torch_threads": torch.get_num_threads()}, indent=1))
        print(f"wrote {RESULTS}")
    finally:
        server.terminate()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
