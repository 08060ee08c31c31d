"""Depth scores from removing one layer: the KL of the logits and the MSE of the final hidden
states, both from the same passes, each equal to a direct computation on the pruned model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import NemotronHForCausalLM

from compression.importance import (
    calibration_rows,
    estimate_importance,
    layer_removal_scores,
    layer_score,
    load_scores,
    random_scores,
    save_scores,
)
from compression.prune import make_plan, prune, prune_model, score_problems
from compression.spec import ImportanceSpec, PruneTarget, SearchSpec
from model.data import PackedTokens
from model.losses import kd_per_token
from model.nemotron_h import build_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ImportanceSpec(samples=2, layer_samples=2, batch_size=2)
PATTERN = "M-*M-M*-"  # Mamba, MLP and attention layers, two of each at least


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = NemotronHForCausalLM(build_config("micro", {"pattern": PATTERN})).eval()
    with torch.no_grad():  # move norm weights and dt_bias away from their constant init
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "dt_bias", "D")):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def data(micro_data):
    return PackedTokens(micro_data.uri, "train")


@pytest.fixture(scope="module")
def depth(net, data):
    return layer_removal_scores(net, data, SPEC)


def _final_hidden(model, ids):  # after the final norm
    with torch.no_grad():
        return model.model(input_ids=ids, use_cache=False).last_hidden_state


def test_layer_mse_and_kl_equal_the_model_pruned_without_the_layer(net, data, depth):
    ids = data.batch(calibration_rows(data, SPEC.layer_samples, SPEC.seed + 1))[0]
    full = _final_hidden(net, ids)
    full_logits = net.lm_head(full)
    for layer in (0, 1, 2):  # a Mamba, an MLP and an attention layer
        pruned = prune_model(net, random_scores(net.config, 0), PruneTarget(drop_layers=[layer]))
        without = _final_hidden(pruned, ids)
        torch.testing.assert_close(depth["layer_mse"][layer], F.mse_loss(without, full), atol=1e-7, rtol=1e-4)
        kl = kd_per_token(pruned.lm_head(without).flatten(0, 1), full_logits.flatten(0, 1)).mean()
        torch.testing.assert_close(depth["layer_kl"][layer], kl, atol=1e-6, rtol=1e-4)
    assert depth["layer_mse"].shape == (len(PATTERN),) and (depth["layer_mse"] > 0).all()


def test_a_layer_that_adds_nothing_scores_zero(net, data, depth):
    silent = copy.deepcopy(net)
    with torch.no_grad():  # every block's last projection: its contribution to the residual stream is 0
        for layer, projection in ((3, "out_proj"), (4, "down_proj"), (6, "o_proj")):
            getattr(silent.model.layers[layer].mixer, projection).weight.zero_()
    scores = layer_removal_scores(silent, data, SPEC)
    for layer in (3, 4, 6):
        assert scores["layer_mse"][layer].abs() < 1e-10 and scores["layer_kl"][layer].abs() < 1e-6
    for layer in (0, 1, 2):  # the layers before them are untouched, and still matter
        assert scores["layer_mse"][layer] > 1e-4 and depth["layer_mse"][layer] > 1e-4


def test_importance_stores_every_depth_score_and_mse_ranks_layers(net, data, depth, tmp_path):
    scores = estimate_importance(net, data, SPEC)
    assert {"layer_kl", "layer_mse", "layer_cosine"} <= scores.keys()
    torch.testing.assert_close(scores["layer_mse"], depth["layer_mse"])
    save_scores(scores, tmp_path / "scores.safetensors", {})
    loaded, _ = load_scores(tmp_path / "scores.safetensors")
    assert score_problems(net.config, loaded, "mse") == []
    target = PruneTarget(num_layers=5, layer_metric="mse")
    expected = sorted(torch.sort(depth["layer_mse"], descending=True, stable=True).indices[:5].tolist())
    assert make_plan(net.config, loaded, target).layers == expected
    assert SearchSpec(budget={"parameters": 10**6}, layer_metric="mse").layer_metric == "mse"


def test_old_score_files_load_and_serve_every_metric_but_mse(net, tmp_path):
    old = {k: v for k, v in random_scores(net.config, 0).items() if k != "layer_mse"}
    save_scores(old, tmp_path / "old.safetensors", {})
    scores, _ = load_scores(tmp_path / "old.safetensors")
    assert score_problems(net.config, scores) == [] and score_problems(net.config, scores, "kl") == []
    for metric in ("kl", "cosine"):
        assert len(make_plan(net.config, scores, PruneTarget(num_layers=6, layer_metric=metric)).layers) == 6
    prune(net, scores, PruneTarget(drop_layers=[1], layer_metric="mse"))  # no ranking: mse not needed
    (problem,) = score_problems(net.config, scores, "mse")
    assert "layer_mse" in problem and "rerun the importance stage" in problem
    with pytest.raises(ValueError, match="rerun the importance stage"):
        layer_score(scores, "mse")
    with pytest.raises(ValueError, match="rerun the importance stage"):
        prune(net, scores, PruneTarget(num_layers=6, layer_metric="mse"))
    bad = scores | {"layer_mse": torch.zeros(3)}
    assert score_problems(net.config, bad) == [f"scores for layer_mse have shape (3,), the model needs ({len(PATTERN)},)"]
