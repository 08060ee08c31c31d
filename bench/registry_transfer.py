"""S3 artifact store throughput: ``S3Store.publish`` / ``fetch`` against plain boto3
``upload_file`` / ``download_file`` of the same files, same transfer settings, same server.

    python bench/registry_transfer.py [--files 4] [--mib 64] [--repeats 3] [--endpoint URL]

Without ``--endpoint`` it starts a moto S3 server on 127.0.0.1 (in-memory; its own speed
bounds both sides). The store adds per-file sha256 (before upload, after download), the
manifest, the listing that lets a re-publish skip whole files, and the checks on fetch;
the goal is publish and fetch within 1.5x of bare boto3. A re-publish of unchanged files
is also timed: it should upload nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from store.s3 import S3Store, default_transfer_config, s3_client  # noqa: E402


def start_moto() -> tuple[subprocess.Popen, str]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return process, endpoint
        except Exception:
            time.sleep(0.2)
    raise TimeoutError("moto did not start")


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mib", type=int, default=64, help="size of each file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--endpoint", help="an S3 endpoint (default: start moto on 127.0.0.1)")
    parser.add_argument("--out", default="bench/results/registry_transfer.json")
    args = parser.parse_args()

    moto = None
    if args.endpoint is None:
        moto, args.endpoint = start_moto()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    os.environ["AWS_ENDPOINT_URL"] = args.endpoint
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            src = tmp / "ckpt"
            src.mkdir()
            for i in range(args.files):
                (src / f"model-{i:05d}.safetensors").write_bytes(os.urandom(args.mib << 20))
            total_mib = args.files * args.mib
            client, config = s3_client(), default_transfer_config()
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            client.create_bucket(Bucket=bucket)
            results = {"bare_upload": [], "publish": [], "republish": [], "bare_download": [], "fetch": []}
            for r in range(args.repeats):
                def bare_upload(r=r):
                    for f in sorted(src.iterdir()):
                        client.upload_file(str(f), bucket, f"bare{r}/{f.name}", Config=config)

                def bare_download(r=r):
                    out = tmp / f"bare-dl{r}"
                    out.mkdir()
                    for f in sorted(src.iterdir()):
                        client.download_file(bucket, f"bare{r}/{f.name}", str(out / f.name), Config=config)

                store = S3Store(f"s3://{bucket}/store{r}", work_dir=tmp / f"work{r}", client=client)
                results["bare_upload"].append(timed(bare_upload))
                results["publish"].append(timed(lambda store=store: store.publish(src, "ckpt")))
                results["republish"].append(timed(lambda store=store: store.publish(src, "ckpt")))
                results["bare_download"].append(timed(bare_download))
                results["fetch"].append(timed(lambda store=store: store.fetch(store.uri("ckpt"))))
            median = {k: statistics.median(v) for k, v in results.items()}
            report = {
                "files": args.files, "mib_each": args.mib, "repeats": args.repeats,
                "seconds_median": {k: round(v, 3) for k, v in median.items()},
                "mib_per_s": {k: round(total_mib / v, 1) for k, v in median.items() if k != "republish"},
                "publish_over_bare_upload": round(median["publish"] / median["bare_upload"], 3),
                "fetch_over_bare_download": round(median["fetch"] / median["bare_download"], 3),
                "republish_over_publish": round(median["republish"] / median["publish"], 3),
            }
            print(json.dumps(report, indent=1))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)


if __name__ == "__main__":
    main()
