"""Peak memory of one distillation step's loss (forward + backward): full logits against chunks.

The full-logit loss holds (B, L, V) float32 logits for teacher and student, their softmaxes and a
gradient: it grows with L x V. The chunked loss (model/losses.py) projects ``--chunk`` positions
at a time under checkpointing: it should stay flat in L. Both run on the same two Nemotron-H
models with Nemotron-H's 131,072-token vocabulary and narrow widths, so the logits dominate.

Each point runs in a fresh process and reports its peak resident memory (ru_maxrss), so one point's
allocations cannot hide another's; the figure to read is the growth over the shortest length,
measured in the same command.

    python bench/loss_memory.py                      # writes bench/results/loss_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one_point(mode: str, seq_len: int, chunk: int) -> float:
    """Peak RSS (GiB) of this process after one KD loss forward + backward."""
    import torch

    from compression.distill import make_kd_loss
    from compression.spec import DistillSpec
    from model.losses import kd_per_token
    from model.nemotron_h import NemotronHForCausalLM, build_config

    torch.manual_seed(0)
    config = build_config("nemotron-h-8b", dict(pattern="M-*-", hidden_size=64, intermediate_size=128,
                                                num_attention_heads=8, mamba_num_heads=8, ssm_state_size=16))
    teacher, student = NemotronHForCausalLM(config).eval(), NemotronHForCausalLM(config)
    ids = torch.randint(3, config.vocab_size, (1, seq_len))
    mask = torch.ones(1, seq_len - 1, dtype=torch.bool)
    if mode == "full":  # what distillation computed before: both models' whole (B, L, V) logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits[:, :-1]
        loss = (kd_per_token(student(input_ids=ids).logits[:, :-1], teacher_logits) * mask).sum()
    else:
        loss = make_kd_loss(teacher, DistillSpec(), chunk_tokens=chunk)(student, ids, mask)
    loss.backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--chunk", type=int, default=512, help="positions per chunk of the chunked loss")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "SEQ_LEN"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loss_memory.json")
    args = parser.parse_args()
    if args.one:
        print(one_point(args.one[0], int(args.one[1]), args.chunk))
        return

    rows = []
    for seq_len in args.seq_lens:
        row = {"seq_len": seq_len}
        for mode in ("full", "chunked"):
            done = subprocess.run([sys.executable, __file__, "--one", mode, str(seq_len), "--chunk", str(args.chunk)],
                                  capture_output=True, text=True, check=True)
            row[f"{mode}_peak_gib"] = round(float(done.stdout.strip().splitlines()[-1]), 3)
        rows.append(row)
        print(row, file=sys.stderr)
    base = rows[0]
    for row in rows:
        for mode in ("full", "chunked"):
            row[f"{mode}_growth"] = round(row[f"{mode}_peak_gib"] / base[f"{mode}_peak_gib"], 2)
    result = {"vocab_size": 131072, "batch": 1, "chunk_tokens": args.chunk, "points": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print("| seq len | full-logit peak (GiB) | growth | chunked peak (GiB) | growth |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['seq_len']} | {row['full_peak_gib']} | {row['full_growth']}x | {row['chunked_peak_gib']} | "
              f"{row['chunked_growth']}x |")


if __name__ == "__main__":
    main()
