"""Training the SDG scorer's reward model (``alignment/reward.py``): a linear head on a frozen
tiny Nemotron-H, on synthetic data whose preferred responses have a property the others lack.

The backbone is the untrained micro Nemotron-H of the SDG tests (hidden size 64): its
last-token state carries the last words of a conversation, not much more, so the synthetic
property is in the ending: chosen responses end with "certainly"; rejected ones carry the same
word, but first. A head that does not read the last real token (or reads it wrongly padded)
cannot separate them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from alignment import data
from alignment.reward import (
    METRICS_FILE,
    REWARD,
    _fold,
    pair_accuracy,
    preference_pairs,
    read_rows,
    train_reward_model,
)
from alignment.spec import RewardSpec
from sdg.output import write_jsonl, write_parquet
from sdg.scorers import HEAD_CONFIG, HEAD_WEIGHTS, RewardModel

from .test_sdg_generation import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = "the river stone cloud city number value list table water light green small house road tree".split()
MARK = "certainly"
# regression: the response's last word sets both labels (plus noise)
ENDINGS = {"certainly": (4.0, 0.0), "indeed": (0.0, 4.0), "maybe": (2.0, 2.0), "no": (0.0, 0.0)}
ATTRIBUTES = ["helpfulness", "verbosity"]


def _words(rng: random.Random) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"pair-{seed}-{i}",
             "prompt_messages": [{"role": "user", "content": " ".join(_words(rng)) + "?"}],
             "chosen_response": " ".join(_words(rng) + [MARK]),
             "rejected_response": " ".join([MARK] + _words(rng))} for i in range(n)]


def labelled_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ending = rng.choice(sorted(ENDINGS))
        helpfulness, verbosity = ENDINGS[ending]
        rows.append({"id": f"row-{i}", "prompt": "tell me about the " + rng.choice(WORDS),
                     "response": " ".join(_words(rng) + [ending]),
                     "helpfulness": helpfulness + rng.random() / 2, "verbosity": verbosity + rng.random() / 2})
    return rows


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


BT_SPEC = RewardSpec(steps=200, held_out_fraction=0.25, seed=0)


@pytest.fixture(scope="module")
def bradley_terry(base_dir, tmp_path_factory, one_torch_thread):
    rows = preference_rows(240)
    out = tmp_path_factory.mktemp("bt") / "reward"
    metrics = train_reward_model(base_dir, rows, out, BT_SPEC, progress=False, source="synthetic pairs")
    return rows, out, metrics


# --------------------------------------------------------------------------------------
# Bradley-Terry
# --------------------------------------------------------------------------------------


def test_the_head_learns_the_preferred_property_and_the_untrained_head_does_not(bradley_terry):
    rows, _, metrics = bradley_terry
    assert metrics["pairs_train"] + metrics["pairs_held_out"] == len(rows)
    assert 40 <= metrics["pairs_held_out"] <= 80  # a quarter of 240, by hash
    assert metrics["train_loss_last"] < 0.5 * metrics["train_loss_first"]
    assert metrics["held_out_accuracy"] >= 0.9
    assert 0.2 <= metrics["held_out_accuracy_untrained"] <= 0.8  # a seeded random head: about chance
    assert metrics["held_out_accuracy"] - metrics["held_out_accuracy_untrained"] >= 0.2
    assert metrics["attributes"] == [REWARD] and metrics["hidden_size"] == 64


def test_the_reward_model_folder_loads_and_scores_as_measured(bradley_terry, base_dir):
    rows, out, metrics = bradley_terry
    assert not (out / "manifest.json").exists() and (out / "tokenizer.json").is_file()
    assert json.loads((out / METRICS_FILE).read_text()) == metrics
    assert json.loads((out / HEAD_CONFIG).read_text())["attributes"] == [REWARD]
    model = RewardModel(out, batch_size=4)
    assert model.attributes == [REWARD]
    _, held = data.held_out_split(rows, BT_SPEC.held_out_fraction, BT_SPEC.seed)
    # Scoring pools as training did: the model scores the held-out pairs as the metrics say.
    assert pair_accuracy(model, held) == pytest.approx(metrics["held_out_accuracy"], abs=1 / len(held))
    [pair] = preference_pairs(held[:1])
    chosen, rejected = model.score([pair.chosen, pair.rejected])
    assert chosen[REWARD] > rejected[REWARD]
    # Fresh pairs (another seed) are ranked too.
    assert pair_accuracy(model, preference_rows(60, seed=7)) >= 0.9


def test_training_is_deterministic(bradley_terry, base_dir, tmp_path):
    rows, out, metrics = bradley_terry
    again = train_reward_model(base_dir, list(reversed(rows)), tmp_path / "again", BT_SPEC, progress=False)
    timeless = lambda m: {k: v for k, v in m.items() if not k.endswith("_seconds")}
    # Neither the split nor the training order depends on the rows' order: the same numbers.
    assert timeless(again) == timeless(metrics)
    assert (tmp_path / "again" / HEAD_WEIGHTS).read_bytes() == (out / HEAD_WEIGHTS).read_bytes()


def test_pair_accuracy_counts_ties_as_wrong_and_checks_weights(bradley_terry):
    _, out, _ = bradley_terry
    model = RewardModel(out)
    rows = preference_rows(4, seed=3)
    assert pair_accuracy(model, rows, {REWARD: -1.0}) == 0.0  # reversed: every pair now loses
    assert pair_accuracy(model, rows, {REWARD: 0.0}) == 0.0  # all ties
    with pytest.raises(ValueError, match="helpfulness"):
        pair_accuracy(model, rows, {"helpfulness": 1.0})


# --------------------------------------------------------------------------------------
# Regression
# --------------------------------------------------------------------------------------


def test_regression_lowers_the_held_out_error_below_the_untrained_head_and_the_mean(base_dir, tmp_path):
    spec = RewardSpec(objective="regression", attributes=ATTRIBUTES, steps=200, held_out_fraction=0.25)
    rows = labelled_rows(240)
    metrics = train_reward_model(base_dir, rows, tmp_path / "rm", spec, progress=False,
                                 eval_pairs=preference_rows(40, seed=1))
    assert metrics["rows_train"] + metrics["rows_held_out"] == 240 and metrics["rows_held_out"] >= 40
    for attribute in ATTRIBUTES:
        mse = metrics["held_out_mse"][attribute]
        assert mse < 0.5 * metrics["held_out_mse_untrained"][attribute], attribute
        assert mse < 0.5 * metrics["held_out_mse_train_mean"][attribute], attribute
    # Pairs measured with the SDG scorer's weights (+helpfulness, -verbosity): chosen ends "certainly".
    assert metrics["accuracy_weights"] == {"helpfulness": 0.3, "verbosity": -0.33}
    assert metrics["held_out_accuracy"] >= 0.8 and metrics["pairs_held_out"] == 40
    # The saved head predicts labels in their own units (standardisation folded in): scoring the
    # held-out rows gives the measured error.
    model = RewardModel(tmp_path / "rm")
    assert model.attributes == ATTRIBUTES
    _, held = data.held_out_split(rows, spec.held_out_fraction, spec.seed)
    scores = model.score([[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
                          for r in held])
    for attribute in ATTRIBUTES:
        mse = sum((s[attribute] - r[attribute]) ** 2 for s, r in zip(scores, held, strict=True)) / len(held)
        assert mse == pytest.approx(metrics["held_out_mse"][attribute], rel=1e-4)
    [certain, indeed] = model.score([[{"role": "user", "content": "tell me about the river"},
                                      {"role": "assistant", "content": f"the river road water {end}"}]
                                     for end in ("certainly", "indeed")])
    assert certain["helpfulness"] > 2.5 > indeed["helpfulness"]
    assert indeed["verbosity"] > 2.5 > certain["verbosity"]


def test_the_saved_head_reads_raw_features_as_the_trained_one_reads_standardised_ones():
    """The fold, on features and labels far from unit scale (a tiny random backbone's are near it)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=generator) * torch.logspace(-2, 3, 16) + 50  # (N, H)
    mean, std = x.mean(0), x.std(0)
    weight, bias = torch.randn(3, 16, generator=generator), torch.randn(3, generator=generator)
    label_mean, label_std = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([0.5, 3.0, 1.0])
    expected = (((x - mean) / std) @ weight.T + bias) * label_std + label_mean
    raw_weight, raw_bias = _fold(weight, bias, mean, std, label_mean, label_std)
    assert torch.allclose(x.double() @ raw_weight.double().T + raw_bias.double(), expected.double(), rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------------------
# The split and the rows
# --------------------------------------------------------------------------------------


def test_the_held_out_split_depends_on_each_row_alone():
    rows = preference_rows(1000)
    train, held = data.held_out_split(rows, 0.2, seed=0)
    ids = lambda part: {r["id"] for r in part}
    assert 150 <= len(held) <= 250 and len(train) + len(held) == 1000
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert ids(data.held_out_split(shuffled, 0.2, seed=0)[1]) == ids(held)  # any order
    assert ids(data.held_out_split(rows[:500], 0.2, seed=0)[1]) == ids(held) & ids(rows[:500])  # any subset
    assert ids(data.held_out_split(rows, 0.2, seed=1)[1]) != ids(held)  # the seed changes it
    assert data.held_out_split(rows, 0.0)[1] == []
    # Without ids, a row's content decides (key order aside).
    plain = [{"a": i, "b": str(i)} for i in range(200)]
    flipped = [{"b": r["b"], "a": r["a"]} for r in reversed(plain)]
    assert sorted(r["a"] for r in data.held_out_split(plain, 0.3, 2)[1]) == \
        sorted(r["a"] for r in data.held_out_split(flipped, 0.3, 2)[1])


def test_rows_are_read_from_files_and_folders(tmp_path):
    rows = preference_rows(3)
    write_jsonl(rows, tmp_path / "preference.jsonl")
    write_parquet(rows, tmp_path / "preference.parquet")
    write_jsonl([{"messages": []}], tmp_path / "sft.jsonl")
    assert read_rows(tmp_path / "preference.parquet") == rows == read_rows(tmp_path / "preference.jsonl")
    assert read_rows(tmp_path) == rows  # the folder's preference file, not sft.jsonl
    single = tmp_path / "single"
    single.mkdir()
    write_parquet(rows, single / "pairs.parquet")
    assert read_rows(single) == rows
    write_jsonl(rows, single / "more.jsonl")
    with pytest.raises(FileNotFoundError, match=r"single: looked for preference\.jsonl, preference\.parquet, or a "
                                                r"single .* it has more\.jsonl, pairs\.parquet"):
        read_rows(single)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        read_rows(tmp_path / "nothing-here")


# --------------------------------------------------------------------------------------
# Refusals, before any compute (the base does not even exist)
# --------------------------------------------------------------------------------------

MISSING_BASE = Path("/nonexistent/base-checkpoint")


def _refused(rows, match, spec=BT_SPEC, **kwargs):
    with pytest.raises(ValueError, match=match):
        train_reward_model(MISSING_BASE, rows, Path("/nonexistent/out"), spec, progress=False, **kwargs)


def test_bad_preference_rows_are_refused_naming_the_problem():
    _refused([], "pairs.jsonl: no preference pairs", source="pairs.jsonl")
    same = preference_rows(3)
    same[1]["rejected_response"] = same[1]["chosen_response"]
    _refused(same, r"pairs.jsonl row 2 \(id 'pair-0-1'\): chosen_response equals rejected_response",
             source="pairs.jsonl")
    missing = preference_rows(3)
    del missing[2]["rejected_response"]
    _refused(missing, r"pairs.jsonl: 'rejected_response' missing or null in 1 rows \(first: row 3\)",
             source="pairs.jsonl")
    bad_prompt = preference_rows(2)
    bad_prompt[0]["prompt_messages"] = "hello"
    _refused(bad_prompt, "row 1 .*prompt_messages is not a non-empty list of messages")


def test_bad_regression_rows_are_refused_naming_the_problem():
    spec = RewardSpec(objective="regression", attributes=ATTRIBUTES)
    rows = labelled_rows(4)
    for row in rows:
        del row["verbosity"]
    _refused(rows, r"labels.parquet: 'verbosity' missing or null in 4 rows", spec, source="labels.parquet")
    rows = labelled_rows(4)
    rows[2]["helpfulness"] = "high"
    _refused(rows, r"row 3 \(id 'row-2'\): label 'helpfulness' is 'high', not a finite number", spec)
    rows = labelled_rows(4)
    rows[0]["verbosity"] = True
    _refused(rows, "label 'verbosity' is True", spec)
    rows = labelled_rows(4)
    del rows[1]["response"]
    _refused(rows, r"row 2 .*needs `messages`, or `prompt` and `response`", spec)
    _refused([], "no rows to train on", spec)


def test_an_occupied_output_folder_is_refused_before_any_compute(base_dir, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        train_reward_model(base_dir, preference_rows(8), tmp_path, BT_SPEC, progress=False)
    with pytest.raises(FileNotFoundError, match="no base checkpoint folder"):
        train_reward_model(MISSING_BASE, preference_rows(8), tmp_path / "new", BT_SPEC, progress=False)
