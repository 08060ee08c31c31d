"""Training the reward model the SDG scorer reads (``sdg/scorers.py: RewardModel``): a linear
head on a frozen causal LM's last-token hidden state.

Plain functions over plain data (no Prefect, no MLflow): rows in, a reward-model folder and
a dict of metrics out.

**How.** The backbone is frozen, so each conversation's features are computed once: the final
hidden state (after the final norm) at its last real token, through ``sdg/scorers.py:
last_token_states``, the function ``RewardModel.score`` pools with (same chat rendering, right
padding, truncation keeping the end). The head is then trained on those features with AdamW:

- ``bradley_terry``: one output, ``reward``; loss -log sigmoid(r_chosen - r_rejected).
- ``regression``: one output per attribute; mean squared error to the labels (Nemotron-4's
  reward model on HelpSteer2's 0-4 attributes).

Features are standardised per dimension (train-split mean and standard deviation) while
training, so one learning rate suits any backbone (a few hidden dimensions of large LMs are
outliers hundreds of times larger than the rest). Regression labels are standardised too: every
attribute weighs the same in the loss whatever its spread, and the head does not spend its
first hundreds of steps moving its bias to the labels' mean. Both affine maps are folded into
the saved head, which reads raw hidden states and predicts labels in their own units (the SDG
stage's weights and thresholds are in those units).

**Scale.** An 8B base (131k vocabulary, hidden size 4096) gives 4096 numbers per conversation,
kept in the backbone's inference dtype (bfloat16 on CUDA: 8 KB per side, 16 KB per pair, ~1.6 GB
for 100k pairs) on the CPU, and read in float32 chunks; the backbone runs once, in inference,
over each distinct conversation.
The head's training is then seconds on the CPU, whatever the base; the vocabulary never enters
(no LM head is run).

The model's folder is a copy of the base checkpoint's files (config, weights, tokenizer; not
its manifest.json) plus ``reward_head.safetensors`` and ``reward_head.json``
(``save_reward_head``), and ``measurements/reward_metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alignment import data
from alignment.spec import RewardSpec
from sdg.scorers import HEAD_CONFIG, HEAD_WEIGHTS, RewardModel, combine, weight_problems

log = logging.getLogger(__name__)

REWARD = "reward"  # the bradley_terry head's one output
PREFERENCE_NAMES = ("preference",)  # the SDG stage's pairs file, in a folder
PAIR_COLUMNS = ("prompt_messages", "chosen_response", "rejected_response")
METRICS_FILE = "measurements/reward_metrics.json"
ENCODE_BATCH = 8  # conversations per backbone forward


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a ``.jsonl`` / ``.parquet`` file or of a folder's ``preference.jsonl`` /
    ``preference.parquet`` (else its only data file)."""
    return data.read_rows(path, PREFERENCE_NAMES)


# --------------------------------------------------------------------------------------
# Rows to examples (checked before any compute)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    chosen: list[dict]  # the conversation ending with the chosen response
    rejected: list[dict]


@dataclass(frozen=True)
class Labelled:
    conversation: list[dict]  # ending with the response the labels are about
    labels: tuple[float, ...]  # one per attribute


def _where(source: str, number: int, row: dict) -> str:
    return f"{source} row {number}" + (f" (id {row['id']!r})" if row.get("id") is not None else "")


def _messages(value, what: str) -> list[dict]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{what} is not a non-empty list of messages")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{what} has a message that is not {{'role': str, 'content': str}}: {m!r:.120}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def preference_pairs(rows: Sequence[dict], source: str = "the rows") -> list[Pair]:
    """Preference rows (``prompt_messages``, ``chosen_response``, ``rejected_response``: the SDG
    stage's ``preference`` dataset) as pairs of conversations; a ValueError naming ``source``,
    the row and the problem for anything else."""
    if not rows:
        raise ValueError(f"{source}: no preference pairs (rows with {', '.join(PAIR_COLUMNS)})")
    data.require_columns(rows, PAIR_COLUMNS, source)
    pairs = []
    for number, row in enumerate(rows, 1):
        where = _where(source, number, row)
        prompt = _messages(row["prompt_messages"], f"{where}: prompt_messages")
        chosen, rejected = row["chosen_response"], row["rejected_response"]
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError(f"{where}: chosen_response and rejected_response must be text")
        if chosen == rejected:
            raise ValueError(f"{where}: chosen_response equals rejected_response (a pair that ranks nothing)")
        pairs.append(Pair(prompt + [{"role": "assistant", "content": chosen}],
                          prompt + [{"role": "assistant", "content": rejected}]))
    return pairs


def labelled_rows(rows: Sequence[dict], attributes: Sequence[str], source: str = "the rows") -> list[Labelled]:
    """Regression rows (``messages`` ending with the response, or ``prompt`` + ``response``; one
    numeric column per attribute: HelpSteer2's layout) as labelled conversations."""
    if not rows:
        raise ValueError(f"{source}: no rows to train on (rows with messages and {', '.join(attributes)})")
    data.require_columns(rows, list(attributes), source)
    examples = []
    for number, row in enumerate(rows, 1):
        where = _where(source, number, row)
        if row.get("messages") is not None:
            conversation = _messages(row["messages"], f"{where}: messages")
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            conversation = [{"role": "user", "content": row["prompt"]},
                            {"role": "assistant", "content": row["response"]}]
        else:
            raise ValueError(f"{where}: no conversation: needs `messages`, or `prompt` and `response` as text")
        labels = []
        for attribute in attributes:
            value = row[attribute]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{where}: label {attribute!r} is {value!r}, not a finite number")
            labels.append(float(value))
        examples.append(Labelled(conversation, tuple(labels)))
    return examples


def default_weights(attributes: Sequence[str]) -> dict[str, float]:
    """How a multi-attribute model's scores make one number when no weights are given: the SDG
    scorer's default (Nemotron-4-340B-Reward's) over the attributes the model has, else 1 each
    (a bradley_terry model: its ``reward``)."""
    from sdg.spec import NEMOTRON_REWARD_WEIGHTS

    weights = {a: w for a, w in NEMOTRON_REWARD_WEIGHTS.items() if a in attributes}
    return weights or {a: 1.0 for a in attributes}


def pair_accuracy(model: RewardModel, pairs: Sequence[dict], weights: dict[str, float] | None = None) -> float:
    """The fraction of preference rows ``pairs`` whose chosen response outscores the rejected one
    (strictly: a tie counts as wrong), scores combined with ``weights`` (``default_weights``)."""
    weights = default_weights(model.attributes) if weights is None else weights
    if problems := weight_problems(model.attributes, weights):
        raise ValueError(problems[0])
    checked = preference_pairs(pairs, "pairs")
    chosen = model.score([p.chosen for p in checked])
    rejected = model.score([p.rejected for p in checked])
    return sum(combine(c, weights) > combine(r, weights) for c, r in zip(chosen, rejected, strict=True)) / len(checked)


# --------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------


def _conversation_key(conversation: list[dict]) -> tuple:
    return tuple((m["role"], m["content"]) for m in conversation)


def conversation_features(model, tokenizer, conversations: Sequence[list[dict]], max_length: int,
                          batch_size: int = ENCODE_BATCH, progress: bool = True):
    """(features, index): ``features[index[i]]`` is conversation i's last-token hidden state
    (``last_token_states``), ``features`` (D, H) on the CPU in the backbone's dtype, one row per
    distinct conversation (each runs once). Batches go longest first: little padding, and a
    batch too large for memory fails at the start."""
    import torch
    from tqdm.auto import tqdm

    from sdg.scorers import last_token_states

    index: dict[tuple, int] = {}
    distinct: list[list[dict]] = []
    rows = []
    for conversation in conversations:
        key = _conversation_key(conversation)
        if key not in index:
            index[key] = len(distinct)
            distinct.append(conversation)
        rows.append(index[key])
    order = sorted(range(len(distinct)), key=lambda i: -sum(len(m["content"]) for m in distinct[i]))
    features = None
    with tqdm(total=len(distinct), desc="reward features", unit="conv", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            pooled = last_token_states(model, tokenizer, [distinct[i] for i in chunk], max_length).cpu()
            if features is None:
                features = torch.empty(len(distinct), pooled.shape[1], dtype=pooled.dtype)
            features[torch.tensor(chunk)] = pooled
            bar.update(len(chunk))
    return features, torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------

_CHUNK = 8192  # feature rows per float32 pass (features stay in the backbone's dtype)


def _feature_moments(features, rows):
    """Per-dimension mean and standard deviation (float32) of ``features[rows]``, in chunks."""
    import torch

    total = torch.zeros(features.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(rows), _CHUNK):
        x = features[rows[start : start + _CHUNK]].double()
        total += x.sum(0)
        squares += (x * x).sum(0)
    mean = total / len(rows)
    std = (squares / len(rows) - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))  # constant dims: leave
    return mean.float(), std.float()


def _apply(weight, bias, features, rows):
    """``features[rows] @ weight.T + bias`` in float32, chunked: (len(rows), A)."""
    import torch

    return torch.cat([features[rows[s : s + _CHUNK]].float() @ weight.T + bias
                      for s in range(0, len(rows), _CHUNK)]) if len(rows) else torch.zeros(0, weight.shape[0])


def _fold(weight, bias, mean, std, label_mean, label_std):
    """The head on standardised features and labels, as a head on raw features giving labels."""
    raw_weight = weight / std  # (A, H)
    raw_bias = bias - raw_weight @ mean
    return label_std[:, None] * raw_weight, label_std * raw_bias + label_mean


def train_reward_model(base_dir: str | Path, rows: Sequence[dict], out_dir: str | Path, spec: RewardSpec,
                       progress: bool = True, *, eval_pairs: Sequence[dict] | None = None,
                       source: str | None = None, device: str = "auto",
                       encode_batch_size: int = ENCODE_BATCH) -> dict:
    """Train a reward head on the frozen checkpoint ``base_dir`` and write the reward model to
    ``out_dir`` (absent or empty), which ``RewardModel(out_dir)`` loads.

    ``rows``: preference rows for ``bradley_terry``; labelled rows for ``regression``, with
    ``eval_pairs`` (preference rows, optional) to measure pair accuracy on, scored with
    ``default_weights``. ``spec.held_out_fraction`` of the rows (by ``data.held_out_split``) are
    kept out of training and measured. ``source`` names the rows' file in errors. The rows are
    checked before any model is loaded.

    Returns (and writes to ``out_dir/measurements/reward_metrics.json``) the metrics: the loss
    on the whole train split before the first step and after the last (``train_loss_first`` /
    ``train_loss_last``; regression: on standardised labels), the number of pairs (rows)
    trained on and held out, and on the held-out split the trained head's pair accuracy
    (regression: per-attribute MSE in label units, and pair accuracy on ``eval_pairs``) next to
    the untrained head's (the seeded random head training starts from, folded the same way);
    regression also gives the MSE of predicting the train mean.
    """
    import torch

    from model.architectures import load_pretrained
    from model.device import DevicePolicy, inference_dtype
    from model.fsutil import atomic_write_text
    from sdg.scorers import save_reward_head

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    source = source or "the rows"
    regression = spec.objective == "regression"
    attributes = list(spec.attributes) if regression else [REWARD]

    # Everything that can be refused, before any compute.
    examples = labelled_rows(rows, attributes, source) if regression else preference_pairs(rows, source)
    by_row = {id(row): example for row, example in zip(rows, examples, strict=True)}
    train_rows, held_rows = data.held_out_split(rows, spec.held_out_fraction, spec.seed)
    # A canonical order (by row key), so nothing downstream depends on the rows' order either.
    train_rows, held_rows = sorted(train_rows, key=data.row_key), sorted(held_rows, key=data.row_key)
    train, held = [by_row[id(r)] for r in train_rows], [by_row[id(r)] for r in held_rows]
    if not train:
        raise ValueError(f"{source}: all {len(rows)} rows fall in the held-out split "
                         f"(held_out_fraction {spec.held_out_fraction}); nothing to train on")
    extra = preference_pairs(eval_pairs, "eval_pairs") if regression and eval_pairs else []
    if not base_dir.is_dir():
        raise FileNotFoundError(f"no base checkpoint folder at {base_dir}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; the reward model needs a fresh one")

    # Features: the backbone once, in inference.
    chosen_device = DevicePolicy.from_environment().choose(device, "reward_model.device")
    started = time.monotonic()
    model, tokenizer = load_pretrained(base_dir, chosen_device, dtype=inference_dtype(chosen_device))
    model.eval()
    if regression:
        conversations = [e.conversation for e in train + held]
        for p in extra:
            conversations += [p.chosen, p.rejected]
    else:
        conversations = [c for p in train + held for c in (p.chosen, p.rejected)]
    features, at = conversation_features(model, tokenizer, conversations, spec.max_length, encode_batch_size,
                                         progress)  # conversation i's features: features[at[i]]
    hidden_size, feature_dtype = features.shape[1], str(features.dtype).removeprefix("torch.")
    del model
    feature_seconds = time.monotonic() - started

    # Indices into `features` for each part (conversations: train then held-out, side by side for pairs).
    n_train, n_held = len(train), len(held)
    if regression:
        train_x, held_x = at[:n_train], at[n_train : n_train + n_held]
        labels = torch.tensor([e.labels for e in train + held], dtype=torch.float32)
        train_y, held_y = labels[:n_train], labels[n_train:]
        label_mean = train_y.mean(0)
        label_std = train_y.std(0, unbiased=False)
        label_std = torch.where(label_std > 0, label_std, torch.ones_like(label_std))
        extra_c, extra_r = at[n_train + n_held :: 2], at[n_train + n_held + 1 :: 2]
        moments_rows = train_x
    else:
        train_c, train_r = at[: 2 * n_train : 2], at[1 : 2 * n_train : 2]
        held_c, held_r = at[2 * n_train :: 2], at[2 * n_train + 1 :: 2]
        label_mean, label_std = torch.zeros(1), torch.ones(1)
        moments_rows = at[: 2 * n_train]
    mean, std = _feature_moments(features, moments_rows)

    # The head, on standardised features (and labels): seeded init, seeded order, AdamW.
    started = time.monotonic()
    generator = torch.Generator().manual_seed(spec.seed)
    head = torch.nn.Linear(hidden_size, len(attributes))
    with torch.no_grad():
        head.weight.copy_(torch.randn(len(attributes), hidden_size, generator=generator) / hidden_size**0.5)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=spec.lr)

    def standardised(rows_):
        return (features[rows_].float() - mean) / std

    def loss_on(rows_) -> torch.Tensor:  # rows_: indices into train (pairs or labelled rows)
        if regression:
            target = (train_y[rows_] - label_mean) / label_std
            return torch.nn.functional.mse_loss(head(standardised(train_x[rows_])), target)
        margin = head(standardised(train_c[rows_])) - head(standardised(train_r[rows_]))
        return -torch.nn.functional.logsigmoid(margin).mean()

    def full_train_loss() -> float:
        with torch.no_grad():
            chunks = [(loss_on(torch.arange(s, min(s + _CHUNK, n_train))), min(_CHUNK, n_train - s))
                      for s in range(0, n_train, _CHUNK)]
        return float(sum(loss.item() * n for loss, n in chunks) / n_train)

    def folded():
        with torch.no_grad():
            return _fold(head.weight.detach(), head.bias.detach(), mean, std, label_mean, label_std)

    initial = folded()
    loss_first = full_train_loss()
    order, position = torch.randperm(n_train, generator=generator), 0
    for _ in range(spec.steps):
        batch = order[position : position + spec.batch_size]
        position += len(batch)
        if position >= n_train:  # a new epoch: reshuffle
            order, position = torch.randperm(n_train, generator=generator), 0
        loss = loss_on(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss_last = full_train_loss()
    trained = folded()
    train_seconds = time.monotonic() - started

    # Measurements with the saved (folded) head: what RewardModel(out_dir) computes.
    weights = default_weights(attributes)
    weight_vector = torch.tensor([weights.get(a, 0.0) for a in attributes])

    def accuracy(head_, chosen_rows, rejected_rows) -> float | None:
        if not len(chosen_rows):
            return None
        margin = (_apply(*head_, features, chosen_rows) - _apply(*head_, features, rejected_rows)) @ weight_vector
        return float((margin > 0).float().mean())

    metrics: dict = {"objective": spec.objective, "attributes": attributes, "base": str(base_dir),
                     "hidden_size": hidden_size, "feature_dtype": feature_dtype, "device": chosen_device,
                     "steps": spec.steps, "batch_size": spec.batch_size, "lr": spec.lr, "seed": spec.seed,
                     "max_length": spec.max_length, "held_out_fraction": spec.held_out_fraction,
                     "train_loss_first": loss_first, "train_loss_last": loss_last}
    if regression:
        def mse(head_) -> dict[str, float] | None:
            if not n_held:
                return None
            errors = ((_apply(*head_, features, held_x) - held_y) ** 2).mean(0)
            return dict(zip(attributes, map(float, errors), strict=True))

        metrics |= {"rows_train": n_train, "rows_held_out": n_held,
                    "held_out_mse": mse(trained), "held_out_mse_untrained": mse(initial),
                    "held_out_mse_train_mean": mse((torch.zeros(len(attributes), hidden_size), label_mean)),
                    "pairs_held_out": len(extra)}
        if extra:
            metrics |= {"held_out_accuracy": accuracy(trained, extra_c, extra_r),
                        "held_out_accuracy_untrained": accuracy(initial, extra_c, extra_r),
                        "accuracy_weights": weights}
    else:
        metrics |= {"pairs_train": n_train, "pairs_held_out": n_held,
                    "train_accuracy": accuracy(trained, train_c, train_r),
                    "held_out_accuracy": accuracy(trained, held_c, held_r),
                    "held_out_accuracy_untrained": accuracy(initial, held_c, held_r)}
    metrics |= {"feature_seconds": round(feature_seconds, 3), "train_seconds": round(train_seconds, 3)}

    # The reward model: the base's files, the head, the metrics.
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = {"manifest.json", HEAD_WEIGHTS, HEAD_CONFIG}
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and path.name not in skip:
            shutil.copy2(path, out_dir / path.name)
    save_reward_head(out_dir, trained[0], trained[1], attributes)
    (out_dir / METRICS_FILE).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=1))
    log.info("reward model %s: %s", out_dir, {k: v for k, v in metrics.items() if "accuracy" in k or "mse" in k})
    return metrics
