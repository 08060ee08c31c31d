"""Distillation loss, the cost model, and the architecture search."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import NemotronHForCausalLM

from compression.distill import check_compatible, kd_per_token, make_kd_loss
from compression.importance import random_scores
from compression.search import enumerate_candidates, search
from compression.spec import Budget, DistillSpec, SearchSpace, SearchSpec
from model.cost import inference_memory, kv_cache_bytes, mamba_state_bytes
from model.data import PackedTokens
from model.nemotron_h import PRESETS, build_config, parameters_by_kind, parameters_by_kind_built
from model.spec import TrainSpec

from .conftest import prepare_data


def _logits(seed, shape=(2, 5, 11)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_kd_is_zero_when_the_student_is_the_teacher():
    t = _logits(0)
    assert kd_per_token(t.clone(), t).abs().max() < 1e-6
    assert kd_per_token(t.clone(), t, temperature=4.0).abs().max() < 1e-6
    # top-k reads the student's full-vocabulary log-probabilities: its mass outside the teacher's
    # top k costs, so the loss is positive until the student puts all its mass there.
    assert (kd_per_token(t.clone(), t, top_k=3) > 0).all()
    peaked = t.clone()
    peaked.scatter_(-1, t.argsort(-1, descending=True)[..., 3:], -1e4)  # no mass outside the top 3
    assert kd_per_token(peaked, t, top_k=3).abs().max() < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_is_scaled_forward_kl_and_its_gradient_matches_the_closed_form(temperature):
    s, t = _logits(1).requires_grad_(), _logits(2)
    loss = kd_per_token(s, t, temperature).sum()
    p = torch.softmax(t / temperature, -1)  # teacher, softened
    q = torch.softmax(s.detach() / temperature, -1)
    reference = temperature**2 * (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(loss, reference)
    loss.backward()
    # d/ds [T^2 KL(p || softmax(s/T))] = T (q - p): the documented T^2 keeps this O(1) in T.
    torch.testing.assert_close(s.grad, temperature * (q - p))


def test_top_k_kd_renormalizes_the_teachers_top_logits():
    s, t = _logits(3), _logits(4)
    got = kd_per_token(s, t, top_k=4)
    values, ids = t.topk(4, -1)
    p = torch.softmax(values, -1)
    log_q = F.log_softmax(s, -1).gather(-1, ids)
    torch.testing.assert_close(got, (p * (p.log() - log_q)).sum(-1))


def test_kd_loss_function_ignores_padding_and_adds_ce_when_asked():
    torch.manual_seed(0)
    teacher = NemotronHForCausalLM(build_config("micro")).eval()
    student = NemotronHForCausalLM(build_config("micro")).eval()
    ids = torch.randint(0, 512, (2, 9))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        plain = make_kd_loss(teacher, DistillSpec())(student, ids, mask)
        per_token = kd_per_token(student(input_ids=ids).logits[:, :-1], teacher(input_ids=ids).logits[:, :-1])
        torch.testing.assert_close(plain, (per_token * mask).sum())
        with_ce = make_kd_loss(teacher, DistillSpec(ce_weight=0.5))(student, ids, mask)
        ce = F.cross_entropy(student(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        torch.testing.assert_close(with_ce, plain + 0.5 * (ce * mask.flatten()).sum())
        assert make_kd_loss(student, DistillSpec())(student, ids, mask).abs() < 1e-4


def test_a_vocabulary_mismatch_is_a_clear_error(tmp_path):
    NemotronHForCausalLM(build_config("micro")).save_pretrained(tmp_path / "teacher")
    NemotronHForCausalLM(build_config("micro", {"vocab_size": 600})).save_pretrained(tmp_path / "student")
    with pytest.raises(ValueError, match="vocabulary of 512 tokens .* 600"):
        check_compatible(tmp_path / "teacher", tmp_path / "student")


# ------------------------------------------------------------------- cost model


def test_parameter_count_matches_the_built_model():
    for preset in PRESETS:
        config = build_config(preset, {"mlp_bias": True, "use_bias": True, "use_conv_bias": False})
        assert parameters_by_kind(config) == parameters_by_kind_built(config), preset


def _measured_cache(config, context: int, batch: int) -> dict[str, int]:
    """Bytes by kind of the cache transformers allocates for ``context`` tokens in generate()."""
    from model.efficiency import measured_cache_bytes

    torch.manual_seed(0)
    model = NemotronHForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (batch, context - 2))
    out = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=None)
    # the cache holds every position except the last generated token's
    return measured_cache_bytes(out.cache) | {"context": context - 1}


@pytest.mark.parametrize("pattern", ["*-*-", "M*M-MM-", "MMMM*"], ids=["attention-only", "hybrid", "mamba-heavy"])
@pytest.mark.parametrize("context", [17, 64])
def test_cost_model_matches_the_cache_transformers_allocates(pattern, context):
    # transformers 5.24's NemotronH cannot run without an attention layer (its cache asks one for
    # the sequence length), so "Mamba-only" is checked per kind on a Mamba-heavy model.
    config = build_config("micro", {"pattern": pattern})
    measured = _measured_cache(config, context, batch=3)
    kv = kv_cache_bytes(config, measured["context"], batch=3, dtype="float32")
    conv, ssm = mamba_state_bytes(config, batch=3, dtype="float32")
    assert measured.get("attention_kv", 0) == kv
    assert measured.get("conv_state", 0) == conv
    assert measured.get("ssm_state", 0) == ssm
    memory = inference_memory(config, sum(parameters_by_kind(config).values()), measured["context"], 3, "float32")
    assert memory.cache == measured["total"]


# ------------------------------------------------------------------- search


@pytest.fixture(scope="module")
def search_setup(tmp_path_factory, corpus_dir):
    from model.spec import DataSpec, TokenizerSpec
    from store.local import LocalStore

    store = LocalStore(tmp_path_factory.mktemp("search-store"))
    data = prepare_data(DataSpec(source=str(corpus_dir), seq_len=32, validation_fraction=0.1),
                        TokenizerSpec(vocab_size=512), store)
    torch.manual_seed(0)
    teacher = NemotronHForCausalLM(build_config("micro", {"pattern": "M-*M-M-*-"})).eval()
    return teacher, random_scores(teacher.config, 0), PackedTokens(data.uri, "train"), PackedTokens(data.uri, "validation")


SPACE = SearchSpace(hidden_size=[48, 64], intermediate_size=[64, 128], mamba_num_heads=[4, 8], num_layers=[7, 9])


def test_candidates_meet_the_budget_and_are_distinct(search_setup):
    teacher, scores, _, _ = search_setup
    full = sum(parameters_by_kind(teacher.config).values())
    budget = Budget(parameters=int(full * 0.6), parameter_tolerance=0.15, memory_gib=1.0, context=1024)
    candidates, rejected = enumerate_candidates(teacher.config, scores, SearchSpec(space=SPACE, budget=budget))
    assert candidates and rejected["parameters"] > 0
    signatures = [json.dumps(c.architecture, sort_keys=True) for c in candidates]
    assert len(set(signatures)) == len(signatures)
    for c in candidates:
        assert abs(c.parameters - budget.parameters) <= 0.15 * budget.parameters
        assert c.memory_bytes <= 2**30
    tight = Budget(parameters=int(full * 0.6), parameter_tolerance=0.15, memory_gib=1e-6)
    assert enumerate_candidates(teacher.config, scores, SearchSpec(space=SPACE, budget=tight))[0] == []


def test_search_choice_is_reproducible_and_reported(search_setup, tmp_path):
    teacher, scores, train, validation = search_setup
    full = sum(parameters_by_kind(teacher.config).values())
    spec = SearchSpec(space=SPACE, budget=Budget(parameters=int(full * 0.6), parameter_tolerance=0.2),
                      top_k=2, zero_shot_sequences=16, throughput_context=32,
                      tie_tolerance=0.0,  # a tie goes to the measured decode speed, which varies from run to run
                      short_kd=DistillSpec(train=TrainSpec(steps=2, batch_size=4, micro_batch_size=4, warmup_steps=1,
                                                           checkpoint_every=10, eval_every=10)))
    first = search(teacher, scores, train, validation, spec, tmp_path / "a")
    second = search(teacher, scores, train, validation, spec, tmp_path / "b")
    assert first["chosen"]["target"] == second["chosen"]["target"]
    assert [c["zero_shot_loss"] for c in first["candidates"]] == [c["zero_shot_loss"] for c in second["candidates"]]
    # Exhaustive: every architecture within the budget is scored (none sampled away).
    admitted, _ = enumerate_candidates(teacher.config, scores, spec)
    assert [c["target"] for c in first["candidates"]] == [c.target for c in admitted]
    assert all(c["zero_shot_loss"] is not None for c in first["candidates"])
    finalists = [c for c in first["candidates"] if c["kd_loss"] is not None]
    assert len(finalists) == 2 and sum(c["chosen"] for c in first["candidates"]) == 1
    best = min(c["kd_loss"] for c in finalists)
    assert first["chosen"]["kd_loss"] <= best + spec.tie_tolerance

    from compression.search import write_report

    write_report(first, tmp_path / "report")
    markdown = (tmp_path / "report" / "measurements" / "search.md").read_text()
    assert "**chosen**" in markdown and "weights / KV / conv / SSM (GiB)" in markdown
    chosen = first["chosen"]
    assert chosen["zero_shot_token_accuracy"] is not None and chosen["kd_greedy_agreement"] is not None
    assert chosen["memory_bytes"] == sum(chosen["memory"].values())
    assert (tmp_path / "report" / "measurements" / "search_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_space_larger_than_max_candidates_is_an_error_before_any_scoring(search_setup, tmp_path, monkeypatch):
    """Before: a seeded random sample was scored, so the best architecture could be dropped unseen."""
    teacher, scores, train, validation = search_setup
    full = sum(parameters_by_kind(teacher.config).values())
    spec = SearchSpec(space=SPACE, budget=Budget(parameters=int(full * 0.6), parameter_tolerance=0.2),
                      max_candidates=5)
    monkeypatch.setattr("compression.search.zero_shot_metrics", lambda *a, **k: pytest.fail("scored a candidate"))
    with pytest.raises(ValueError, match=r"9 architectures in the search space meet the budget, more than "
                                         r"search.max_candidates \(5\)"):
        search(teacher, scores, train, validation, spec, tmp_path)


def test_the_latency_budget_is_measured_at_its_own_batch_and_context(search_setup, tmp_path, monkeypatch):
    """Before: budget.batch and budget.latency_context were documented but the throughput settings were used."""
    import model.efficiency

    teacher, scores, train, validation = search_setup
    measured = []

    def spy(model, batch, context, **kwargs):
        measured.append((batch, context))
        return {"decode_tokens_per_s": 1.0, "decode_seconds": 1e-3 * (1000 if context == 48 else 1), "decode_tokens": 1}

    monkeypatch.setattr(model.efficiency, "measure_point", spy)
    full = sum(parameters_by_kind(teacher.config).values())
    spec = SearchSpec(space=SPACE, budget=Budget(parameters=int(full * 0.6), parameter_tolerance=0.2, batch=3,
                                                 latency_context=48, decode_latency_ms=10.0),
                      throughput_batch=2, throughput_context=32, zero_shot_sequences=8)
    with pytest.raises(ValueError, match="every candidate is over the decode-latency budget"):
        search(teacher, scores, train, validation, spec, tmp_path)
    assert measured and set(measured) == {(3, 48)}


def test_token_metrics_on_hand_made_logits():
    from compression.search import metrics_from_sums, token_metric_sums

    logits = torch.tensor([[2.0, 0, 0], [0, 3, 0], [0, 0, 1], [1, 0, 5]])  # argmax 0, 1, 2, 2
    targets = torch.tensor([0, 1, 1, 2])  # right, right, wrong, (right: masked out)
    teacher = torch.tensor([0, 2, 1, 2])  # agrees, no, no, (yes: masked out)
    mask = torch.tensor([1, 1, 1, 0])
    metrics = metrics_from_sums(token_metric_sums(logits, targets, mask, teacher))
    assert metrics["token_accuracy"] == pytest.approx(2 / 3)
    assert metrics["greedy_agreement"] == pytest.approx(1 / 3)
    assert metrics["lm_loss"] == pytest.approx(F.cross_entropy(logits[:3], targets[:3]).item())
    assert metrics_from_sums(token_metric_sums(logits, targets, mask), with_agreement=False)["greedy_agreement"] is None


def test_zero_shot_metrics_match_the_evaluation_loop_and_the_teacher_agrees_with_itself(search_setup):
    from compression.search import zero_shot_metrics
    from evaluation.quality import next_token_hits
    from model.train import evaluate_loss

    teacher, _, _, validation = search_setup
    rows = range(6)
    metrics, greedy = zero_shot_metrics(teacher, validation, rows, 4, keep_argmax=True, chunk_tokens=7)
    assert [g.shape[0] for g in greedy] == [4 * 31, 2 * 31]  # one argmax per position, per micro-batch
    assert metrics["lm_loss"] == pytest.approx(evaluate_loss(teacher, validation, rows, 4), rel=1e-5)
    assert metrics["token_accuracy"] == pytest.approx(evaluate_loss(teacher, validation, rows, 4, next_token_hits))
    again, _ = zero_shot_metrics(teacher, validation, rows, 4, reference=greedy)
    assert again["greedy_agreement"] == 1.0 and again["lm_loss"] == pytest.approx(metrics["lm_loss"])
    flipped = [(g + 1) % teacher.config.vocab_size for g in greedy]
    assert zero_shot_metrics(teacher, validation, rows, 4, reference=flipped)[0]["greedy_agreement"] == 0.0


@pytest.mark.parametrize("ranking", ["lm_loss", "token_accuracy", "greedy_agreement"])
def test_the_search_ranks_candidates_by_the_chosen_metric(search_setup, tmp_path, monkeypatch, ranking):
    import compression.search as search_module

    teacher, scores, train, validation = search_setup
    calls = []

    def fake_metrics(model, data, rows, micro, reference=None, keep_argmax=False, **kwargs):
        i = len(calls)  # call 0 is the teacher's; loss and accuracy both rise, agreement zigzags
        calls.append(model)
        return {"lm_loss": 1.0 + i, "token_accuracy": i / 100, "greedy_agreement": (i * 4 % 9) / 9}, (
            [] if keep_argmax else None)

    monkeypatch.setattr(search_module, "zero_shot_metrics", fake_metrics)
    monkeypatch.setattr(search_module, "_decode_speed", lambda *a: (1.0, 1.0))
    full = sum(parameters_by_kind(teacher.config).values())
    spec = SearchSpec(space=SPACE, budget=Budget(parameters=int(full * 0.6), parameter_tolerance=0.2), top_k=2,
                      ranking=ranking)
    report = search(teacher, scores, train, validation, spec, tmp_path,
                    short_kd=lambda student, rank, description: (student, {"steps": 0, "tokens_seen": 0}))
    field_name, higher_is_better = search_module.RANKINGS[ranking]
    by_rank = sorted(report["candidates"], key=lambda c: c["rank"])
    values = [c[field_name] for c in by_rank]
    assert values == sorted(values, reverse=higher_is_better) and len(set(values)) == len(values) == 9
    assert [c["finalist"] for c in by_rank] == ["top_k"] * 2 + [None] * 7
    assert all((c["kd_loss"] is not None) == (c["rank"] <= 2) for c in report["candidates"])
    # lm_loss ranks in enumeration order, token_accuracy in reverse (both rise with the call count)
    first = [c["rank"] for c in report["candidates"]][0]
    assert first == {"lm_loss": 1, "token_accuracy": 9, "greedy_agreement": by_rank.index(report["candidates"][0]) + 1}[
        ranking]


def _shaped(name, hidden, ffn, layers):
    from compression.search import Candidate

    return Candidate(target={"name": name}, parameters=0, memory_bytes=0.0,
                     architecture={"hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": 4,
                                   "mamba_num_heads": 8, "mamba_head_dim": 16, "layer_pattern": "M" * layers})


def test_the_diverse_finalist_is_the_remaining_candidate_farthest_from_the_top_k():
    from compression.search import choose_finalists, shape_distance, shape_of

    teacher = shape_of(_shaped("teacher", 100, 400, 10).architecture)
    assert teacher == {"hidden_size": 100, "intermediate_size": 400, "num_attention_heads": 4, "mamba_num_heads": 8,
                       "mamba_head_dim": 16, "num_layers": 10}
    ranked = [_shaped("a", 80, 400, 10), _shaped("b", 80, 300, 10), _shaped("c", 80, 300, 9),  # near the top 2
              _shaped("d", 100, 200, 5), _shaped("e", 50, 400, 6),  # d: 0.2+0.25+0.5 from a, e: 0.3+0.4 = 0.7
              _shaped("f", 80, 200, 5)]  # f: 0.25 + 0.5 = 0.75 from b
    assert shape_distance(shape_of(ranked[3].architecture), shape_of(ranked[0].architecture), teacher) == \
        pytest.approx(0.2 + 0.5 + 0.5)
    finalists = choose_finalists(ranked, 2, True, teacher)
    # d's nearest finalist is b (0.2 + 0.25 + 0.5 = 0.95), e's is a (0.3 + 0.4 = 0.7), f's is b (0.75)
    assert [c.target["name"] for c in finalists] == ["a", "b", "d"]
    assert [c.finalist for c in ranked] == ["top_k", "top_k", None, "diverse", None, None]
    # an equally distant, better-ranked candidate wins the tie; no diversity asked: the top k only
    tied = [_shaped("a", 80, 400, 10), _shaped("b", 80, 300, 10), _shaped("x", 80, 300, 5), _shaped("y", 80, 300, 5)]
    assert [c.target["name"] for c in choose_finalists(tied, 2, True, teacher)] == ["a", "b", "x"]
    assert [c.target["name"] for c in choose_finalists(tied, 2, False, teacher)] == ["a", "b"]
    same = [_shaped("a", 80, 400, 10), _shaped("a2", 80, 400, 10)]  # every remaining shape is a finalist's
    assert [c.target["name"] for c in choose_finalists(same, 1, True, teacher)] == ["a"]


def test_each_memory_component_counts_in_its_own_dtype(search_setup):
    from pydantic import ValidationError

    from compression.search import budget_memory

    teacher, scores, _, _ = search_setup
    config, parameters = teacher.config, 1_000_000
    fp8 = budget_memory(config, parameters, Budget(memory_gib=1, context=4096, batch=2, dtype="fp8"))
    mixed = budget_memory(config, parameters, Budget(memory_gib=1, context=4096, batch=2, dtype="fp8",
                                                     weights_dtype="fp4", kv_cache_dtype="bfloat16"))
    assert mixed.weights == fp8.weights / 2 == parameters * 0.5  # fp4 weights: half the fp8 bytes
    assert mixed.kv_cache == 2 * fp8.kv_cache == kv_cache_bytes(config, 4096, 2, "bfloat16")
    assert (mixed.conv_state, mixed.ssm_state) == (fp8.conv_state, fp8.ssm_state) == mamba_state_bytes(config, 2, "fp8")
    assert mixed == inference_memory(config, parameters, 4096, 2, "fp8", weights_dtype="fp4",
                                     kv_cache_dtype="bfloat16")
    state = budget_memory(config, parameters, Budget(memory_gib=1, context=4096, batch=2, mamba_state_dtype="fp8"))
    assert (state.conv_state, state.ssm_state) == mamba_state_bytes(config, 2, "fp8", ssm_dtype="fp8")
    assert mamba_state_bytes(config, 2, "fp8")[1] == 4 * state.ssm_state  # the default SSM state is float32
    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        Budget(memory_gib=1, kv_cache_dtype="int3")

    # One candidate: in the budget with fp4 weights, out of it with fp8 weights (the same bf16 KV cache).
    space = SearchSpace(hidden_size=[48])
    common = dict(context=4096, dtype="bfloat16", kv_cache_dtype="bfloat16")
    (probe,), _ = enumerate_candidates(config, scores, SearchSpec(space=space, budget=Budget(memory_gib=64, **common,
                                                                                           weights_dtype="fp8")))
    assert set(probe.memory) == {"weights", "kv_cache", "conv_state", "ssm_state"}
    assert probe.memory_bytes == sum(probe.memory.values())
    limit = (probe.memory_bytes - probe.memory["weights"] / 4) / 2**30  # between fp4 and fp8 weights
    for weights_dtype, admitted in (("fp4", 1), ("fp8", 0)):
        budget = Budget(memory_gib=limit, weights_dtype=weights_dtype, **common)
        candidates, rejected = enumerate_candidates(config, scores, SearchSpec(space=space, budget=budget))
        assert (len(candidates), rejected["memory"]) == (admitted, 1 - admitted)


def test_hymba_memory_components_add_up_to_its_cache_formula():
    from compression.search import budget_memory
    from model.hymba import build_config as hymba_config
    from model.hymba import cache_bytes

    config = hymba_config("micro")
    memory = budget_memory(config, 1000, Budget(memory_gib=1, context=300, batch=3))
    assert memory.weights == 2000
    assert memory.cache == 3 * cache_bytes(config, 300, kv_bytes=2, state_bytes=4)
    assert memory.kv_cache > 0 and memory.conv_state > 0 and memory.ssm_state > 0
    fp8_state = budget_memory(config, 1000, Budget(memory_gib=1, context=300, batch=3, mamba_state_dtype="fp8"))
    assert (fp8_state.kv_cache, fp8_state.conv_state * 2, fp8_state.ssm_state * 4) == (
        memory.kv_cache, memory.conv_state, memory.ssm_state)


@pytest.mark.slow
def test_the_search_stage_runs_short_kd_through_the_distillation_launcher(micro_data, tmp_path):
    """Before: short KD ran in the search's process whatever short_kd.train.num_processes said."""
    from compression import importance_stage, search_stage
    from compression.spec import ImportanceSpec
    from model import pretrain_stage
    from model.contract import StageContext
    from model.device import DevicePolicy
    from model.pretrain_stage import PretrainSpec
    from model.spec import ModelSpec
    from store.local import LocalStore

    store, context = LocalStore(tmp_path / "store"), StageContext("launch", device=DevicePolicy("cpu"))
    tiny = dict(batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=2, eval_every=2, eval_batches=1)
    teacher = pretrain_stage.run(PretrainSpec(model=ModelSpec(preset="micro"), train=TrainSpec(steps=2, **tiny)),
                                 {"data": micro_data}, store, context)
    inputs = {"teacher": teacher, "data": micro_data}
    scores = importance_stage.run(ImportanceSpec(samples=4, batch_size=4, layer_samples=2), inputs, store, context)
    spec = SearchSpec(space=SearchSpace(hidden_size=[48]), budget=Budget(memory_gib=64), top_k=1,
                      zero_shot_sequences=4, throughput_context=16,
                      short_kd=DistillSpec(train=TrainSpec(steps=2, num_processes=2, parallelism="fsdp", **tiny)))
    report = search_stage.run(spec, inputs | {"scores": scores}, store, context)
    (work,) = (p for p in (tmp_path / "store" / "search").iterdir() if p.is_dir())
    launch = json.loads((work / "candidates" / "candidate-0" / "launch.json").read_text())
    assert launch["spec"]["train"]["num_processes"] == 2 and launch["spec"]["train"]["parallelism"] == "fsdp"
    chosen = json.loads((store.fetch(report.uri) / "measurements" / "search.json").read_text())["chosen"]
    assert chosen["kd_loss"] is not None and "short KD: 2 steps" in chosen["notes"][-1]
