"""The one-command GPU check (``make gpu-check``): what a GPU machine can show in under 9 minutes.

    environment   torch, CUDA, the GPU, and whether mamba-ssm's and causal-conv1d's kernels import
    fused_path    a Nemotron-H's logits on the GPU in bfloat16 (the fused kernels where installed)
                  against the float32 PyTorch path on the CPU: KL (must be under 1e-3) and top-1 agreement
    stage_tests   ``pytest -m gpu`` (tests/test_gpu.py): every stage on CUDA in bf16, resume after a kill
    scale         the 8B shape with random weights: nemotron-h-8b in bf16 on the GPU, importance on a
                  few 8K sequences, pruning to the paper's 4B (hidden 3072, FFN 12288, 112 Mamba heads
                  x 64), a few KD steps, decode throughput of teacher, student and an attention-only
                  model of the student's size at 8K and 64K context (batch 1 and 8), and the student's
                  training throughput and MFU in bf16 and fp8

Every check is recorded as passed / failed / skipped (with why) in the JSON, written after each
one, so a run cut short still leaves what it measured. A time budget (``--budget-s``) skips what
would not fit rather than overrunning the machine's lease.

    python bench/gpu_check.py                      # on a GPU machine (make gpu-check)
    python bench/gpu_check.py --dry-run            # the same script on the CPU with tiny shapes

Nothing here needs Prefect or MLflow: the stages are called directly.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; fp8 is twice these.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}

# fused_path's model: the 8B pattern at narrow widths, 2 x 512 tokens (4 of the Mamba scan's 128-token chunks).
FUSED = dict(overrides=dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, mamba_num_heads=16,
                            ssm_state_size=64, vocab_size=4096), batch=2, tokens=512)
# The dry run's layers: the 8B pattern's first 9 (Mamba-2, FFN and attention blocks: every kind of layer the 8B
# has; the code does not change with depth). Its 52 made the CPU rehearsal take minutes: layer KL runs the model
# once per layer (52 x 52 blocks, 285 s of the dry run on a busy machine), and every other step runs all 52.
DRY_PATTERN = "M-M-M-M*-"

# The dry run measures nothing, so it runs torch on one intra-op thread (and so do the stage tests' processes),
# as tests/conftest.py's one_torch_thread does: on a CPU whose cores other processes keep busy, OpenMP threads
# waiting for each other made small ops 10-20x slower (bf16 depthwise convolution's backward, one channel at a
# time: 0.025 s on one thread, 0.35-0.55 s on two, per Mamba layer at the dry widths).
DRY_RUN_THREADS = 1

SHAPES = {
    # The published 8B teacher and the paper's 4B target.
    "real": dict(teacher_overrides={}, target=dict(hidden_size=3072, intermediate_size=12288, mamba_num_heads=112),
                 seq_len=8192, calibration_rows=4, kd_steps=3, train_steps=3, contexts=[8192, 65536],
                 batches=[1, 8], decode_tokens=32, fused=FUSED),
    # The dry run on a CPU: the 8B's head dims and groups with narrow widths, DRY_PATTERN's depth and a 4,096-token
    # vocabulary. Not the 8B's 131,072: bf16 matmuls are emulated on a CPU without bf16 units, and the output
    # head's backward alone, (128 x 131,072) @ (131,072 x 192), took 15 s per step here (0.09 s in float32); the
    # uint32 token shards such a vocabulary needs are tests/test_data.py's. A 32-token Mamba chunk makes the
    # 128-token sequences 4 chunks, so the scan passes state between chunks as at 8K tokens (a 128-token chunk
    # would be the whole sequence).
    "dry": dict(teacher_overrides=dict(pattern=DRY_PATTERN, hidden_size=256, intermediate_size=512,
                                       num_attention_heads=8, mamba_num_heads=16, ssm_state_size=16, chunk_size=32,
                                       vocab_size=4096),
                target=dict(hidden_size=192, intermediate_size=384, mamba_num_heads=8),
                seq_len=128, calibration_rows=2, kd_steps=2, train_steps=1, contexts=[128], batches=[1, 2],
                decode_tokens=4,
                fused=dict(overrides=FUSED["overrides"] | dict(pattern=DRY_PATTERN, chunk_size=32), batch=2,
                           tokens=96)),
}


class Check:
    """Runs named checks, records each in ``results`` and writes the JSON after every one."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.started, self.budget_s = out, time.monotonic(), budget_s
        self.results = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "checks": {}}

    def time_left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def run(self, name: str, fn, *args):
        """``fn(check, *args)`` may fill ``check.results["checks"][name]`` as it goes (kept if it fails)."""
        print(f"== {name} ({self.time_left():.0f} s left)", file=sys.stderr, flush=True)
        started = time.monotonic()
        record = self.results["checks"].setdefault(name, {})
        record["status"] = "running"
        try:
            record |= fn(self, *args) or {}
            record["status"] = "passed"
        except Skip as skip:
            record |= {"status": "skipped", "why": str(skip)}
        except Exception as error:  # noqa: BLE001 - every failure is recorded, the other checks still run
            record |= {"status": "failed", "error": f"{type(error).__name__}: {error}",
                       "traceback": traceback.format_exc(limit=8)}
        record["seconds"] = round(time.monotonic() - started, 1)
        self.write()
        print(f"   {record['status']} in {record['seconds']} s", file=sys.stderr, flush=True)
        return record

    def write(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1, default=str))


class Skip(Exception):
    """A check that cannot run here (no kernels, no time left); recorded with its reason."""


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# --------------------------------------------------------------------------------------
# environment and fused path
# --------------------------------------------------------------------------------------


def environment(check: Check, device: torch.device) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
                 "memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}
    for package in ("triton", "mamba_ssm", "causal_conv1d", "torchao"):
        info[package] = importlib.util.find_spec(package) is not None
    return info


def fused_path(check: Check, device: torch.device, dry_run: bool) -> dict:
    """Logits on ``device`` in bf16 against the float32 PyTorch path on the CPU (same random weights)."""
    import logging

    from model.losses import kd_per_token
    from model.nemotron_h import NemotronHForCausalLM, build_config

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    torch.manual_seed(0)
    shape = SHAPES["dry" if dry_run else "real"]["fused"]
    config = build_config("nemotron-h-8b", shape["overrides"])
    reference = NemotronHForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (shape["batch"], shape["tokens"]),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
        fused = reference.to(device, torch.bfloat16)(input_ids=ids.to(device)).logits.float().cpu()
    logging.getLogger("transformers").removeHandler(handler)
    agreement = (fused.argmax(-1) == expected.argmax(-1)).float().mean().item()
    kl = kd_per_token(fused, expected).mean().item()  # KL(fp32 reference || bf16 run), nats per token
    fallbacks = sorted({m.split("`")[1] for m in messages if "falling back" in m and "`" in m})
    result = {"top1_agreement": round(agreement, 4), "kl_nats_per_token": kl, "pytorch_fallbacks": fallbacks,
              "kernels_used": device.type == "cuda" and not fallbacks}
    # KL, not top-1 agreement, decides: a random model's logits are nearly flat, so bf16 rounding flips
    # a few percent of its argmaxes (0.96 agreement at KL 5e-5 on the CPU); a wrong kernel gives KL >> 1e-3.
    if kl > 1e-3:
        raise AssertionError(f"bf16 logits on {device} disagree with the float32 reference: {result}")
    return result


class StageTests:
    """``pytest -m gpu`` (tests/test_gpu.py) in a child process, started here, its output in files."""

    def __init__(self, dry_run: bool):
        import tempfile

        env = dict(os.environ, PYTHONPATH=str(REPO))
        if dry_run:
            env |= {"FACTORY_GPU_TESTS_ON_CPU": "1", "OMP_NUM_THREADS": str(DRY_RUN_THREADS)}  # its workers inherit it
        command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
        self.stdout, self.stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.stdout, stderr=self.stderr, text=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def result(self, timeout: float) -> dict:
        try:
            self.process.wait(timeout=timeout)
        finally:
            self.stop()
        outputs = []
        for file in (self.stdout, self.stderr):
            file.seek(0)
            outputs.append(file.read())
            file.close()
        stdout, stderr = outputs
        summary = (stdout.strip().splitlines() or [""])[-1]
        if self.process.returncode != 0:
            raise AssertionError(f"pytest -m gpu: {summary}\n{stdout[-4000:]}\n{stderr[-2000:]}")
        return {"summary": summary, "process_s": round(time.monotonic() - self.started, 1)}  # since it started


def stage_tests(check: Check, device: torch.device, dry_run: bool, started: StageTests | None = None) -> dict:
    """``pytest -m gpu`` in a child process (on the CPU in a dry run, where main started it before the
    other checks: ``started``)."""
    if started is None:
        if check.time_left() < 120:
            raise Skip("less than 120 s left")
        started = StageTests(dry_run)
    return started.result(timeout=max(60, check.time_left() - 60))


# --------------------------------------------------------------------------------------
# the 8B shape
# --------------------------------------------------------------------------------------


def _random_tokens(folder: Path, vocab_size: int, seq_len: int, rows: int) -> Path:
    """Packed shards of random token ids (train and validation), as the data stage writes them."""
    from model.data import META_NAME, pack_split

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    splits = {}
    for split in ("train", "validation"):
        documents = (torch.randint(3, vocab_size, (seq_len - 1,), generator=generator).tolist() for _ in range(rows))
        splits[split] = pack_split(documents, vocab_size, 2, 0, seq_len, folder, split)
    (folder / META_NAME).write_text(json.dumps({"seq_len": seq_len, "eos_id": 2, "pad_id": 0, "splits": splits}))
    return folder


def _attention_only_like(student_config, parameters: int):
    """A Nemotron-H of attention + FFN layers only, with the student's widths and about its parameters."""
    from model.nemotron_h import build_config, summarize

    fields = {k: getattr(student_config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                        "num_key_value_heads", "head_dim", "vocab_size")}
    pairs = 1
    while summarize(build_config("nemotron-h-8b", fields | {"pattern": "*-" * pairs}))["parameters"] < parameters:
        pairs += 1
    return build_config("nemotron-h-8b", fields | {"pattern": "*-" * pairs})


def _train_throughput(model, loss_fn, data, shape: dict, steps: int, precision: str, device: torch.device,
                      peak_flops: float | None) -> dict:
    """``steps`` timed optimizer steps of ``loss_fn`` at micro batch 1, after an untimed first one:
    tokens/s, MFU (6 x parameters x tokens/s over the dense peak), peak memory and the losses."""
    from model.device import autocast
    from model.train import _float8

    model.to(device, torch.float32).train()
    if precision == "fp8":
        _float8(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    parameters = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(steps + 1):  # the first step compiles and allocates: not timed
        input_ids, valid = data.batch([step % len(data)])
        input_ids, target_mask = input_ids.to(device), valid[:, 1:].to(device)
        _sync(device)
        started = time.perf_counter()
        with autocast(device, precision):
            loss = loss_fn(model, input_ids, target_mask) / target_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step:
            times.append(time.perf_counter() - started)
        losses.append(loss.item())
    tokens_per_s = shape["seq_len"] / statistics.median(times)
    peak = peak_flops * (2 if precision == "fp8" else 1) if peak_flops else None
    return {"precision": precision, "tokens_per_s": round(tokens_per_s, 1), "losses": losses,
            "mfu": round(6 * parameters * tokens_per_s / peak, 4) if peak else None, "peak_gib": _peak_gib(device)}


def scale(check: Check, device: torch.device, dry_run: bool, work: Path) -> dict:
    from compression.distill import make_kd_loss
    from compression.importance import activation_scores, layer_kl_scores
    from compression.prune import prune
    from compression.spec import DistillSpec, ImportanceSpec, PruneTarget
    from model.data import PackedTokens
    from model.efficiency import measure_point
    from model.losses import lm_loss
    from model.nemotron_h import NemotronHForCausalLM, build_config, summarize

    shape = SHAPES["dry" if dry_run else "real"]
    kernels = all(importlib.util.find_spec(p) is not None for p in ("mamba_ssm", "causal_conv1d"))
    if not dry_run and not kernels:
        # Measured on the CPU rehearsal: the fallback's (chunks x chunk x chunk x heads x state) tensor is
        # 8.6 GB per layer at 16 heads and state 128; the 8B's 128 heads make it ~69 GB.
        raise Skip("mamba-ssm and causal-conv1d are not importable: transformers' PyTorch fallback for the Mamba-2 "
                   "scan cannot hold 8K-token sequences at the 8B's width (~69 GB per layer)")
    result = check.results["checks"]["scale"]  # filled as it goes: a run cut short keeps what it measured
    config = build_config("nemotron-h-8b", shape["teacher_overrides"])
    data = PackedTokens(_random_tokens(work / "tokens", config.vocab_size, shape["seq_len"],
                                       shape["calibration_rows"] + max(shape["kd_steps"], shape["train_steps"]) + 1),
                        "train")

    started = time.monotonic()
    with torch.device(device):
        teacher = NemotronHForCausalLM._from_config(config, dtype=torch.bfloat16 if device.type == "cuda"
                                                    else torch.float32).eval()
    result["teacher"] = {"parameters": summarize(config)["parameters"], "build_s": round(time.monotonic() - started, 1),
                         "peak_gib": _peak_gib(device)}

    started = time.monotonic()
    spec = ImportanceSpec(samples=shape["calibration_rows"], batch_size=1, layer_samples=1)
    scores = activation_scores(teacher, data, spec)
    scores["layer_kl"] = layer_kl_scores(teacher, data, spec)
    result["importance"] = {"rows": shape["calibration_rows"], "seq_len": shape["seq_len"],
                            "seconds": round(time.monotonic() - started, 1), "peak_gib": _peak_gib(device)}
    check.write()

    student, _ = prune(teacher, scores, PruneTarget(**shape["target"]))
    result["student"] = {"parameters": summarize(student.config)["parameters"], **shape["target"]}
    attention_only = _attention_only_like(student.config, result["student"]["parameters"])
    check.write()

    decode = result.setdefault("decode", [])
    for name, model_or_config in (("teacher", teacher), ("student", student), ("attention_only", attention_only)):
        if check.time_left() < 240:
            decode.append({"model": name, "skipped": "time budget"})
            continue
        if not isinstance(model_or_config, torch.nn.Module):
            with torch.device(device):
                model_or_config = NemotronHForCausalLM._from_config(model_or_config, dtype=teacher.dtype).eval()
        for context in shape["contexts"]:
            for batch in shape["batches"]:
                try:
                    point = measure_point(model_or_config, batch, context, shape["decode_tokens"], warmup=1,
                                          repeats=1, device=device)
                    decode.append({"model": name, "batch": batch, "context": context,
                                   "decode_tokens_per_s": round(point["decode_tokens_per_s"], 1),
                                   "prefill_tokens_per_s": round(point["prefill_tokens_per_s"], 1),
                                   "cache_gib": round(point["cache_bytes"] / 2**30, 3)})
                except torch.OutOfMemoryError:
                    decode.append({"model": name, "batch": batch, "context": context, "skipped": "out of memory"})
                    torch.cuda.empty_cache()
                check.write()
        if name == "attention_only":
            del model_or_config

    if check.time_left() < 150:
        raise Skip("no time left for the KD steps and training throughput (importance, pruning and decode ran)")
    student_config = student.config
    student_state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
    kd = _train_throughput(student, make_kd_loss(teacher, DistillSpec()), data, shape, shape["kd_steps"], "bf16",
                           device, None)
    result["kd_steps"] = kd
    del student, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    check.write()

    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items()
                 if device.type == "cuda" and name in torch.cuda.get_device_name(device)), None)
    training = result.setdefault("training", [])
    from model.device import fp8_problem

    for precision in ("bf16", "fp8"):
        if precision == "fp8" and (problem := fp8_problem(device)):
            training.append({"precision": "fp8", "skipped": problem})
            continue
        if check.time_left() < 60:
            training.append({"precision": precision, "skipped": "time budget"})
            continue
        with torch.device("meta"):
            fresh = NemotronHForCausalLM(student_config)
        fresh.load_state_dict(student_state, assign=True)
        training.append(_train_throughput(fresh, lm_loss, data, shape, shape["train_steps"], precision, device,
                                          peak))
        del fresh
        if device.type == "cuda":
            torch.cuda.empty_cache()
        check.write()
    return {}


# --------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = ["| check | status | seconds | detail |", "|---|---|---|---|"]
    for name, record in results["checks"].items():
        detail = ""
        if record["status"] != "passed":
            detail = (record.get("why") or record.get("error") or "").split("\n")[0]
        if name == "fused_path" and record["status"] == "passed":
            detail = f"top-1 {record['top1_agreement']}, KL {record['kl_nats_per_token']:.2e}, " \
                     f"fallbacks {record['pytorch_fallbacks'] or 'none'}"
        lines.append(f"| {name} | {record['status']} | {record.get('seconds', '')} | {detail[:100]} |")
    scale_record = results["checks"].get("scale", {})
    for point in scale_record.get("decode", []):
        if "decode_tokens_per_s" in point:
            lines.append(f"| decode {point['model']} b{point['batch']} ctx {point['context']} | | | "
                         f"{point['decode_tokens_per_s']} tok/s, cache {point['cache_gib']} GiB |")
    for run in scale_record.get("training", []):
        if "tokens_per_s" in run:
            lines.append(f"| train student {run['precision']} | | | {run['tokens_per_s']} tok/s, MFU {run['mfu']}, "
                         f"peak {run['peak_gib']} GiB |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same checks on the CPU with tiny shapes")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/gpu_check[-dry].json)")
    parser.add_argument("--budget-s", type=float, default=510, help="stop starting new work after this many seconds")
    parser.add_argument("--skip", nargs="*", default=[], choices=["fused_path", "stage_tests", "scale"])
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device on this machine. Run it on a GPU machine, or rehearse it here "
              "with `python bench/gpu_check.py --dry-run`.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if not args.dry_run else "cpu")
    if args.dry_run:
        torch.set_num_threads(DRY_RUN_THREADS)
    out = args.out or REPO / "bench" / "results" / ("gpu_check-dry.json" if args.dry_run else "gpu_check.json")
    check = Check(out, args.budget_s)
    check.results["dry_run"] = args.dry_run
    # On the GPU the checks run one after another: they share the GPU, and the scale check's timings must not
    # share it. On the CPU the stage tests' processes (a pytest and its training workers, ~9 s of imports each
    # here) start first and run beside the other checks, each process on one thread, and their check waits for
    # them last: the dry run takes about as long as its longest part, not the sum of its parts.
    early = StageTests(args.dry_run) if args.dry_run and "stage_tests" not in args.skip else None
    try:
        check.run("environment", lambda c: {"info": environment(c, device)})
        if "fused_path" not in args.skip:
            check.run("fused_path", fused_path, device, args.dry_run)
        if "stage_tests" not in args.skip and early is None:
            check.run("stage_tests", stage_tests, device, args.dry_run)
        if "scale" not in args.skip:
            import tempfile

            with tempfile.TemporaryDirectory() as work:
                check.run("scale", scale, device, args.dry_run, Path(work))
        if early is not None:
            check.run("stage_tests", stage_tests, device, args.dry_run, early)
    finally:
        if early is not None:
            early.stop()
    print(table(check.results))
    print(f"\nwritten: {out}")
    return 1 if any(r["status"] == "failed" for r in check.results["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
