"""Evaluation: quality against plain transformers, recall generators and scorers, cache bytes
against the analytic count, the gate, the reports, and the evaluate stage's caching."""

from __future__ import annotations

import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import evaluation.evaluate
from evaluation import evaluate_stage
from evaluation.evaluate import evaluate_folders
from evaluation.evaluate_stage import Evaluation
from evaluation.gate import apply_gate, relative_to_teacher
from evaluation.quality import measure_quality
from evaluation.recall import (
    IGNORE,
    make_mqar,
    make_passkey_prompts,
    mqar_loss,
    passkey_accuracy,
    passkey_answer,
    passkey_range,
    recall_accuracy,
    write_mqar_rows,
)
from evaluation.report import plot_loss_curves, plot_pareto, plot_recall, write_report
from evaluation.spec import EfficiencySpec, EvaluateSpec, GateSpec, QualitySpec, RecallSpec
from model.architectures import build_model_config
from model.contract import ArchSummary, Lineage, ModelRef, StageContext
from model.data import PackedTokens
from model.efficiency import analytic_cache_bytes, measure_efficiency, measured_cache_bytes
from model.nemotron_h import NemotronHForCausalLM, build_config, summarize
from model.spec import DataSpec, ModelSpec, TokenizerSpec, TrainSpec
from model.tokenizer import load_tokenizer
from model.train import HISTORY_FILE, global_batch, train
from store.local import LocalStore

from .conftest import prepare_data, run_factory

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_validation(corpus_dir, micro_data, tmp_path_factory):
    """Forty short documents cut from the corpus, packed with micro_data's tokenizer: a validation
    split of a few dozen rows (the last one padded) that a test can score row by row."""
    folder = tmp_path_factory.mktemp("small-corpus")
    text = "".join(p.read_text() for p in sorted(corpus_dir.iterdir())[:3])
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(text[i * 400 : (i + 1) * 400])
    store = LocalStore(tmp_path_factory.mktemp("small-data"))
    return prepare_data(DataSpec(source=str(folder), seq_len=64, validation_fraction=0.3),
                        TokenizerSpec(path=micro_data.tokenizer_uri), store)


def save_micro_checkpoint(data_ref, folder, seed=0, overrides=None):
    """A random-weight micro Nemotron-H saved as a checkpoint folder (weights, config, tokenizer)."""
    tokenizer = load_tokenizer(data_ref.tokenizer_uri)
    config = build_model_config(ModelSpec(preset="micro", overrides=overrides or {}), tokenizer)
    torch.manual_seed(seed)
    NemotronHForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_dir(micro_data, tmp_path_factory):
    return save_micro_checkpoint(micro_data, tmp_path_factory.mktemp("teacher"), seed=0)


@pytest.fixture(scope="module")
def student_dir(micro_data, tmp_path_factory):
    # About half the widths of the teacher, same tokenizer.
    return save_micro_checkpoint(micro_data, tmp_path_factory.mktemp("student"), seed=1,
                                 overrides={"hidden_size": 32, "intermediate_size": 64})


# --------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------


def test_validation_loss_equals_plain_transformers_loss(small_validation, teacher_dir, student_dir):
    quality = QualitySpec(validation_rows=None, micro_batch_size=3, generation_prompts=4, prompt_tokens=16,
                          generation_tokens=8)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    result = measure_quality(student, small_validation.uri, quality, teacher)

    # Independently: transformers' own loss (labels=..., -100 on padding), weighted by target count.
    data = PackedTokens(small_validation.uri, "validation")
    assert 8 < len(data) < 100 and data.valid_tokens(len(data) - 1) < data.seq_len
    reference = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(len(data)):
            input_ids, valid = data.batch([row])
            labels = input_ids.masked_fill(~valid, -100)
            targets = int(valid[0, 1:].sum())
            total += reference(input_ids=input_ids, labels=labels).loss.item() * targets
            count += targets
    assert result["val_tokens"] == count
    assert result["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["val_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert 0 <= result["val_token_accuracy"] <= 1

    # A different model disagrees with the teacher; the teacher agrees with itself exactly.
    assert result["kl_to_teacher"] > 0.01
    assert 0 <= result["greedy_agreement"] < 1
    itself = measure_quality(teacher, small_validation.uri, quality, teacher)
    assert itself["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert itself["greedy_agreement"] == 1.0 and itself["greedy_prefix_match"] == 1.0


# --------------------------------------------------------------------------------------
# Recall: MQAR and passkey
# --------------------------------------------------------------------------------------


def test_mqar_is_deterministic_and_well_formed():
    a = make_mqar(64, 64, 8, vocab_size=128, seed=3)
    b = make_mqar(64, 64, 8, vocab_size=128, seed=3)
    c = make_mqar(64, 64, 8, vocab_size=128, seed=4)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.input_ids, c.input_ids)
    assert a.input_ids.shape == a.labels.shape == (64, 64)
    for ids, labels in zip(a.input_ids, a.labels, strict=True):
        keys, values = ids[0:16:2], ids[1:16:2]
        assert len(set(keys)) == 8 and all(k < 64 <= v for k, v in zip(keys, values, strict=True))
        queries = np.flatnonzero(labels != IGNORE)
        assert len(queries) == 8 and queries.min() >= 16
        pairs = dict(zip(keys, values, strict=True))
        assert sorted(ids[queries]) == sorted(keys)  # every key asked exactly once
        assert all(labels[q] == pairs[ids[q]] for q in queries)
    with pytest.raises(ValueError, match="at least 4 x num_kv_pairs"):
        make_mqar(4, 32, 16, vocab_size=128, seed=0)


def test_mqar_scorer_gives_oracle_100_and_random_chance():
    data = make_mqar(500, 64, 8, vocab_size=64, seed=0)
    oracle = np.where(data.labels != IGNORE, data.labels, 0)
    assert recall_accuracy(oracle, data.labels) == 1.0
    rng = np.random.default_rng(0)
    random_values = rng.integers(32, 64, size=data.labels.shape)  # uniform over the 32 value ids
    accuracy = recall_accuracy(random_values, data.labels)
    queries = int((data.labels != IGNORE).sum())
    assert data.chance == 1 / 32
    assert abs(accuracy - data.chance) < 4 * math.sqrt(data.chance * (1 - data.chance) / queries)


def test_passkey_prompts_are_deterministic_fit_and_score(teacher_dir):
    tokenizer = load_tokenizer(teacher_dir)
    prompts = make_passkey_prompts(tokenizer, 512, trials=6, seed=1)
    assert prompts == make_passkey_prompts(tokenizer, 512, trials=6, seed=1)
    assert prompts != make_passkey_prompts(tokenizer, 512, trials=6, seed=2)
    for p in prompts:
        assert p.num_tokens <= 512 and f"The pass key is {p.key}." in p.text and p.key in passkey_range(5)
        assert len(tokenizer(p.text)["input_ids"]) == p.num_tokens
    keys = [p.key for p in prompts]
    assert passkey_accuracy([f" {k}. Remember" for k in keys], keys) == 1.0
    assert passkey_answer("no digits") is None

    # One-digit keys: a random guesser scores about 1/10.
    keys = [p.key for p in make_passkey_prompts(tokenizer, 256, trials=2000, seed=0, digits=1)]
    guesses = [str(g) for g in np.random.default_rng(1).integers(0, 10, size=len(keys))]
    chance = 1 / len(passkey_range(1))
    assert abs(passkey_accuracy(guesses, keys) - chance) < 4 * math.sqrt(chance * (1 - chance) / len(keys))


def test_mqar_training_loss_is_the_mean_cross_entropy_at_queries(tmp_path):
    """MQAR rows go through the factory's own loop; its logged loss is the CE at the query positions."""
    data = make_mqar(16, 32, 4, vocab_size=64, seed=0)
    rows = PackedTokens(write_mqar_rows(data, tmp_path / "mqar"), "train")
    config = build_config("micro", {"vocab_size": 64})
    torch.manual_seed(0)
    net = NemotronHForCausalLM(config)
    first = global_batch(0, 8, len(rows), seed=0)  # the rows the loop's first step draws
    with torch.no_grad():
        logits = net(input_ids=torch.from_numpy(data.input_ids[first]), use_cache=False).logits
        labels = torch.from_numpy(data.labels[first])
        expected = F.cross_entropy(logits[labels != IGNORE], labels[labels != IGNORE]).item()
    spec = TrainSpec(steps=1, batch_size=8, micro_batch_size=4, lr=1e-3, warmup_steps=0, seed=0)
    history = train(net, rows, spec, tmp_path / "work", loss_fn=mqar_loss)["history"]
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------------------
# Efficiency
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["M-*M-", "*-*-"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_cache_bytes_equal_the_analytic_count(pattern, dtype):
    config = build_config("micro", {"pattern": pattern})
    torch.manual_seed(0)
    net = NemotronHForCausalLM(config).to(dtype).eval()
    sizes = {}
    for batch, length in ((1, 16), (3, 40), (3, 80)):
        with torch.no_grad():
            cache = net(input_ids=torch.randint(3, 512, (batch, length)), use_cache=True).cache
        measured = measured_cache_bytes(cache)
        analytic = analytic_cache_bytes(config, length, batch, dtype)
        assert measured == analytic, (batch, length)
        sizes[(batch, length)] = measured
    # KV grows with the context; the Mamba conv and SSM states do not.
    assert sizes[(3, 80)]["attention_kv"] == 2 * sizes[(3, 40)]["attention_kv"]
    if "M" in pattern:
        assert sizes[(3, 80)]["ssm_state"] == sizes[(3, 40)]["ssm_state"] == 3 * sizes[(1, 16)]["ssm_state"]
        # SSM state in float32 whatever the model dtype: layers x H x P x N x 4 bytes.
        assert sizes[(1, 16)]["ssm_state"] == 2 * 8 * 8 * 8 * 4


def test_measured_cache_bytes_equal_the_compression_cost_model():
    """The cost model (model/cost.py) counts the same bytes the cache holds, in bf16 too."""
    from model import cost as budget

    config = build_config("micro", {"pattern": "M-*M-*-"})
    net = NemotronHForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        measured = measured_cache_bytes(net(input_ids=torch.randint(3, 512, (2, 24)), use_cache=True).cache)
    conv, ssm = budget.mamba_state_bytes(config, 2, "bfloat16")
    assert measured["attention_kv"] == budget.kv_cache_bytes(config, 24, 2, "bfloat16")
    assert (measured["conv_state"], measured["ssm_state"]) == (conv, ssm)


def test_efficiency_reports_throughput_cache_and_memory(teacher_dir):
    net = AutoModelForCausalLM.from_pretrained(teacher_dir)
    result = measure_efficiency(net, [1, 2], [16, 32], decode_tokens=2, warmup=0, repeats=1, device=torch.device("cpu"))
    assert result["device"] == "cpu" and result["clock"] == "perf_counter"
    assert [(p["batch_size"], p["context_length"]) for p in result["points"]] == [(1, 16), (1, 32), (2, 16), (2, 32)]
    for p in result["points"]:
        assert p["prefill_tokens_per_s"] > 0 and p["decode_tokens_per_s"] > 0
        assert p["cache_bytes"] == p["analytic_cache_bytes"] == p["batch_size"] * p["cache_bytes_per_sequence"]
        assert p["peak_memory_kind"] in ("process_peak_rss", "process_lifetime_peak_rss")
        assert p["peak_memory_bytes"] > sum(t.numel() * 4 for t in net.parameters())


# --------------------------------------------------------------------------------------
# Gate and reports (synthetic results: the numbers are chosen, the behaviour is tested)
# --------------------------------------------------------------------------------------


def fake_result(parameters, val_loss, decode, prefill, cache, mqar=0.5, passkey=0.2, pattern="M-*M-"):
    points = [{"batch_size": b, "context_length": n, "decode_tokens": 4, "prefill_seconds": 1.0, "decode_seconds": 1.0,
               "prefill_tokens_per_s": prefill * b, "decode_tokens_per_s": decode * b, "cache_bytes": cache * b,
               "cache_bytes_per_sequence": cache, "cache_bytes_by_kind": {}, "analytic_cache_bytes": cache * b,
               "peak_memory_bytes": 2**20, "peak_memory_kind": "process_peak_rss"} for b in (1, 8) for n in (128, 512)]
    return {
        "model": {"path": "/x", "family": "nemotron_h", "parameters": parameters, "layer_pattern": pattern},
        "quality": {"val_loss": val_loss, "val_perplexity": math.exp(val_loss)},
        "tasks": {"factory_kv_recall": {"acc": 0.4, "acc_stderr": 0.05, "acc_norm": 0.3}},
        "recall": {"mqar": [{"seq_len": n, "num_kv_pairs": kv, "accuracy": mqar * (64 / n), "queries": 100, "chance": 0.01}
                            for n in (64, 128) for kv in (4, 8)],
                   "passkey": [{"context_length": n, "accuracy": passkey, "trials": 5, "mean_tokens": n, "chance": 1e-5}
                               for n in (256, 512)]},
        "efficiency": {"device": "cpu", "dtype": "float32", "clock": "perf_counter", "torch_threads": 2, "points": points},
        "skipped": {},
    }


def test_gate_passes_fails_and_says_why():
    teacher = fake_result(1_000_000, 3.0, decode=100, prefill=1000, cache=4096)
    student = fake_result(500_000, 3.15, decode=150, prefill=1800, cache=2048, mqar=0.6)
    ratios = relative_to_teacher(student, teacher)
    assert ratios["val_loss_ratio"] == pytest.approx(1.05) and ratios["decode_speedup"] == pytest.approx(1.5)
    assert ratios["cache_bytes_ratio"] == pytest.approx(0.5)

    ok = apply_gate(GateSpec(max_val_loss_ratio=1.1, min_decode_speedup=1.2, min_mqar_accuracy=0.3,
                             min_task_scores={"factory_kv_recall": 0.3}), student, teacher)
    assert ok.passed and len(ok.checks) == 4 and ok.reasons == []

    strict = apply_gate(GateSpec(max_val_loss_ratio=1.02, min_decode_speedup=2.0, min_passkey_accuracy=0.1,
                                 min_task_scores={"factory_kv_recall/acc_norm": 0.5}), student, teacher)
    assert not strict.passed
    assert any("val_loss_ratio 1.05 > 1.02" in r for r in strict.reasons)
    assert any("decode_speedup 1.5 < 2" in r for r in strict.reasons)
    assert any("factory_kv_recall/acc_norm 0.3 < 0.5" in r for r in strict.reasons)
    assert not any("passkey" in r for r in strict.reasons)

    alone = apply_gate(GateSpec(min_decode_speedup=1.0, min_task_scores={"mmlu": 0.3}), student, None)
    assert not alone.passed and any("no teacher to compare with" in r for r in alone.reasons)
    assert any("mmlu/acc: not measured" in r for r in alone.reasons)
    assert apply_gate(GateSpec(), student).passed


def test_report_renders_pngs_with_the_expected_series(tmp_path):
    results = {"teacher": fake_result(1_000_000, 3.0, decode=100, prefill=1000, cache=4096),
               "student-50": fake_result(500_000, 3.2, decode=160, prefill=1900, cache=2048),
               "student-25": fake_result(250_000, 3.6, decode=210, prefill=2500, cache=1024)}
    histories = {"teacher": [{"step": s, "loss": 5 - 0.1 * s} | ({"val_loss": 5.1 - 0.1 * s} if s % 5 == 0 else {})
                             for s in range(1, 21)],
                 "student-50": [{"step": s, "loss": 4 - 0.05 * s} for s in range(1, 11)]}

    pareto = plot_pareto(results, teacher="teacher")
    size_ax, speed_ax = pareto.axes
    series = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in size_ax.lines}
    assert series["teacher"] == ([1_000_000.0], [3.0]) and series["student-25"] == ([250_000.0], [3.6])
    assert series["Pareto frontier"][0] == [250_000.0, 500_000.0, 1_000_000.0]
    speed = {line.get_label(): list(line.get_xdata()) for line in speed_ax.lines}
    assert speed["student-50"] == [160 * 8]  # the largest batch and context every model has: b8, L512
    assert "b8, L512" in speed_ax.get_xlabel()

    recall = plot_recall(results)
    mqar_ax, passkey_ax = recall.axes
    lines = {line.get_label(): line for line in mqar_ax.lines}
    assert set(lines) == {"teacher", "student-50", "student-25", "chance"}
    assert list(lines["teacher"].get_xdata()) == [64, 128] and list(lines["teacher"].get_ydata()) == [0.5, 0.25]
    assert [line.get_label() for line in passkey_ax.lines][:3] == ["teacher", "student-50", "student-25"]

    curves = plot_loss_curves(histories)
    labels = [line.get_label() for line in curves.axes[0].lines]
    assert labels == ["teacher train", "teacher validation", "student-50 train"]
    assert list(curves.axes[0].lines[1].get_xdata()) == [5, 10, 15, 20]

    gates = {label: apply_gate(GateSpec(max_val_loss_ratio=1.1), results[label], results["teacher"])
             for label in ("student-50", "student-25")}
    summary = write_report(results, tmp_path, "teacher", gates, histories)
    assert set(summary["plots"]) == {"loss_curves", "recall", "pareto"}
    for relative in summary["plots"].values():
        path = tmp_path / relative
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(path)  # decodes the PNG
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 0.01
    report = (tmp_path / "report.md").read_text()
    assert "| student-25 | 250.00K |" in report and "FAIL" in report and "val_loss_ratio 1.2 > 1.1" in report
    assert "![pareto](plots/pareto.png)" in report
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["models"]["student-50"]["relative_to_teacher"]["decode_speedup"] == pytest.approx(1.6)
    assert metrics["gates"]["student-50"]["passed"] and not metrics["gates"]["student-25"]["passed"]


# --------------------------------------------------------------------------------------
# Errors before compute; the stage; the command line
# --------------------------------------------------------------------------------------


def test_checkpoint_folders_with_missing_files_are_named(tmp_path, teacher_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((teacher_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"broken is missing \*\.safetensors \(the weights\), tokenizer\.json"):
        evaluate_folders({"teacher": teacher_dir, "broken": broken}, EvaluateSpec(), tmp_path / "out", "teacher")
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


SMALL = EvaluateSpec(
    sections=["quality", "recall", "efficiency"],
    quality=QualitySpec(validation_rows=8, micro_batch_size=4, generation_prompts=3, prompt_tokens=16, generation_tokens=4),
    recall=RecallSpec(mqar_seq_lens=[32, 64], mqar_kv_pairs=[4, 8], mqar_examples=4, passkey_context_lengths=[256],
                      passkey_trials=1, passkey_digits=2),
    efficiency=EfficiencySpec(batch_sizes=[1], context_lengths=[16, 32], decode_tokens=2, warmup=0, repeats=1),
    gate=GateSpec(max_val_loss_ratio=2.0, max_cache_bytes_ratio=1.0),
)


def _published_ref(store, folder, key, stage):
    uri = store.publish(folder, key)
    return ModelRef(uri=uri, digest=store.published_digest(uri),
                    architecture=ArchSummary(**summarize(AutoConfig.from_pretrained(folder))),
                    lineage=Lineage(stage=stage, spec_digest="", code_digest=""))


def test_evaluate_stage_reports_gates_and_measures_each_model_once(tmp_path, micro_data, teacher_dir, student_dir,
                                                                 monkeypatch):
    store = LocalStore(tmp_path / "store")
    history = [{"step": s, "loss": 6 - 0.1 * s} for s in range(1, 6)]
    (teacher_dir / HISTORY_FILE).parent.mkdir(exist_ok=True)
    (teacher_dir / HISTORY_FILE).write_text(json.dumps({"metrics": {}, "history": history}))
    teacher = _published_ref(store, teacher_dir, "pretrain/teacher-run/model", "pretrain")
    student = _published_ref(store, student_dir, "distill/student-run/model", "distill")

    inputs = {"teacher": teacher, "models": [student], "data": micro_data}
    result = evaluate_stage.run(SMALL, inputs, store, StageContext("micro"))
    assert isinstance(result, Evaluation) and store.verify(result.uri, result.digest)
    assert result.models == {"teacher": teacher.digest, "student-run": student.digest}
    assert result.metrics["student-run"]["kl_to_teacher"] > 0
    assert result.metrics["student-run"]["parameters"] < result.metrics["teacher"]["parameters"]
    gate = result.gates["student-run"]
    assert gate.passed, gate.reasons  # a narrower student: a smaller cache, loss within 2x of an untrained teacher
    assert result.gate_of(student.digest) == gate and result.gate_of(teacher.digest) is None
    report = result.uri
    for name in ("metrics.json", "report.md", "plots/pareto.png", "plots/recall.png", "plots/loss_curves.png"):
        assert (tmp_path / "store" / "evaluate").joinpath(report.split("/evaluate/")[1], name).is_file()

    # Again, with a stricter gate: nothing is measured again and the verdict changes.
    def no_measuring(*args, **kwargs):
        raise AssertionError("re-measured a model whose result is stored")

    monkeypatch.setattr(evaluation.evaluate, "evaluate_checkpoint", no_measuring)
    strict = SMALL.model_copy(update={"gate": GateSpec(max_val_loss_ratio=2.0, max_cache_bytes_ratio=0.1)})
    again = evaluate_stage.run(strict, inputs, store, StageContext("micro"))
    assert again.metrics == result.metrics
    assert not again.gates["student-run"].passed
    assert "cache_bytes_ratio" in again.gates["student-run"].reasons[0]


@pytest.mark.slow  # a `factory` subprocess
def test_factory_evaluate_model_command(tmp_path, teacher_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # see one_torch_thread
    out = tmp_path / "report"
    result = run_factory("evaluate-model", str(teacher_dir), "--sections", "recall", "efficiency", "--out", str(out),
                         root=tmp_path / "root")
    assert result.stdout.strip().endswith(str(out / "report.md"))
    metrics = json.loads((out / "metrics.json").read_text())
    (label,) = metrics["models"]
    assert set(metrics["models"][label]["result"]) >= {"recall", "efficiency"}

    missing = run_factory("evaluate-model", str(tmp_path / "nowhere"), root=tmp_path / "root", check=False)
    assert missing.returncode == 1 and "nowhere is not a folder" in missing.stderr
    unknown = run_factory("evaluate-model", str(teacher_dir), "--sections", "bogus", root=tmp_path / "root", check=False)
    assert unknown.returncode == 2 and "sections.0" in unknown.stderr
