"""What people see: the evaluation report's charts in the Prefect UI, flow runs named after their
recipe, and ``factory models list`` as one readable line per version. In-process, no server."""

from __future__ import annotations

import base64
import json
import re

from .conftest import MICRO_RECIPE, run_cli, write_recipe
from .test_evaluation import fake_result


def _published_report(tmp_path):
    """A real evaluation report (evaluation/report.py), published as the evaluate stage leaves it."""
    from evaluation import evaluate_stage
    from evaluation.report import write_report
    from model.contract import Lineage
    from store.local import LocalStore

    results = {"teacher": fake_result(1_000_000, 3.0, decode=100, prefill=1000, cache=4096),
               "student": fake_result(500_000, 3.2, decode=160, prefill=1900, cache=2048)}
    write_report(results, tmp_path / "work" / "report", "teacher",
                 histories={"teacher": [{"step": s, "loss": 5 - 0.1 * s} for s in range(1, 11)]})
    store = LocalStore(tmp_path / "store")
    uri = store.publish(tmp_path / "work" / "report", "evaluate/micro-abc/report")
    ref = evaluate_stage.Evaluation(uri=uri, digest=store.published_digest(uri), teacher="teacher",
                                    lineage=Lineage(stage="evaluate", spec_digest="s", code_digest="c"))
    return evaluate_stage.summary(ref, store), store


def test_the_evaluation_charts_are_embedded_in_the_prefect_markdown(tmp_path, monkeypatch):
    """report.md links its charts relative to its folder (``plots/pareto.png``), which a browser would
    resolve against the Prefect UI's own address; the UI's markdown carries the images themselves."""
    from tasks import ui

    summary, store = _published_report(tmp_path)
    assert "![pareto](plots/pareto.png)" in summary.markdown  # the file on disk keeps portable links
    shown = {}
    monkeypatch.setattr(ui, "create_markdown_artifact",
                        lambda markdown, key, description: shown.update({key: markdown}))
    monkeypatch.setattr(ui, "create_table_artifact", lambda *a, **k: None)
    ui.show_result("micro", "evaluate", None, summary)

    markdown = shown["micro-evaluate"]
    images = dict(re.findall(r"!\[([^\]]*)\]\(([^)]*)\)", markdown))
    assert set(images) == {"loss_curves", "recall", "pareto"}, images
    for name, source in images.items():  # what an <img src> renders with no file beside it
        assert source.startswith("data:image/png;base64,"), (name, source[:40])
        png = base64.b64decode(source.removeprefix("data:image/png;base64,"), validate=True)
        assert png == (store.path / "evaluate/micro-abc/report/plots" / f"{name}.png").read_bytes()
    assert "](plots/" not in markdown and "| student | 500.00K |" in markdown  # the tables are unchanged


def test_images_that_cannot_be_embedded_are_named_instead_of_shown_broken(tmp_path):
    from tasks.ui import MAX_INLINE_IMAGE_BYTES, inline_images

    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "big.png").write_bytes(b"\x89PNG" + b"0" * MAX_INLINE_IMAGE_BYTES)
    (tmp_path / "notes.txt").write_text("x")
    files = [str(tmp_path / "plots" / "big.png"), str(tmp_path / "notes.txt")]
    markdown = ("![web](https://example.org/a.png) ![big](plots/big.png) ![gone](plots/gone.png) "
                "![text](notes.txt) ![inline](data:image/png;base64,AAAA)")
    shown = inline_images(markdown, files)
    assert "![web](https://example.org/a.png)" in shown and "![inline](data:image/png;base64,AAAA)" in shown
    assert "*big: `" in shown and "too large to show here" in shown
    assert "*gone: `plots/gone.png` (not available here)*" in shown
    assert "*text: `notes.txt` (not available here)*" in shown
    assert "](plots/" not in shown


def test_flow_runs_are_named_after_the_recipe(tmp_path):
    from flows.factory import run_name
    from flows.recipe import parse_recipe

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("text")
    recipe = dict(MICRO_RECIPE, name="tiny-factory",
                  data={**MICRO_RECIPE["data"], "source": str(tmp_path / "corpus")})
    path = write_recipe(tmp_path / "some-file.yaml", recipe)
    assert run_name(parse_recipe(recipe), "factory") == "tiny-factory: factory"  # the UI's form
    assert run_name(recipe, "distill") == "tiny-factory: distill"  # a deployment's parameters
    assert run_name(str(path), "pretrain") == "tiny-factory: pretrain"  # the name inside the file
    assert run_name(str(tmp_path / "missing.yaml"), "factory") == "missing: factory"  # the run then fails


def _versions():
    """list_models rows: a teacher with its training metrics, a student with the gate's many metrics."""
    gate_metrics = {f"decode_tokens_per_s.b{b}_L{n}": str(100.0 * b + n / 7)
                    for b in (1, 8) for n in (128, 512)}
    gate_metrics |= {"val_loss": "5.25193", "kl_to_teacher": "0.0123456", "greedy_agreement": "0.8125",
                     "cache_bytes_ratio": "0.5"}
    common = {"git_commit": "f" * 40, "digest": "d" * 64}
    return [
        {"name": "micro", "version": "1", "aliases": ["candidate", "champion"], "stage": "distill",
         "parameters": "1234567", "tokens_seen": "98304", "eval_status": "passed",
         "parent": "micro-teacher/1",
         "metrics": {**gate_metrics, "final_loss": "5.4"}, **common},
        {"name": "micro-teacher", "version": "1", "aliases": ["candidate"], "stage": "pretrain",
         "parameters": "6260000", "tokens_seen": "3145728", "eval_status": "", "parent": "",
         "metrics": {"val_loss": "6.1", "final_loss": "6.05432", "tokens_seen": "3145728"}, **common},
    ]


def test_models_list_shows_one_aligned_row_per_version_with_the_key_metrics(monkeypatch, capsys):
    import registry.models

    monkeypatch.setattr(registry.models, "list_models", lambda name=None: _versions())
    code, out, _ = run_cli("models", "list", capsys=capsys)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["MODEL", "VERSION", "ALIASES", "STAGE", "PARAMS", "TOKENS", "EVAL", "VAL_LOSS",
                              "FINAL_LOSS", "PARENT"]
    assert [row.split() for row in rows] == [
        ["micro", "1", "candidate,champion", "distill", "1.23M", "98.30K", "passed", "5.252", "5.4",
         "micro-teacher/1"],
        ["micro-teacher", "1", "candidate", "pretrain", "6.26M", "3.15M", "-", "6.1", "6.054", "-"]]
    assert max(len(line) for line in out.splitlines()) <= 120  # not every metric on one line
    # aligned: text columns start, number columns end, at the same place on every line
    assert header.index("STAGE") == rows[0].index(" distill ") + 1 == rows[1].index(" pretrain ") + 1
    assert header.index("VAL_LOSS") + 8 == rows[0].index(" 5.252 ") + 6 == rows[1].index(" 6.1 ") + 4

    code, out, _ = run_cli("models", "list", "--metrics", "kl_to_teacher,decode_tokens_per_s@b8_L512",
                           "--all-metrics", capsys=capsys)
    table, metrics = out.split("\n\n")
    assert table.splitlines()[0].split()[7:] == ["KL_TO_TEACHER", "DECODE_TOKENS_PER_S.B8_L512", "PARENT"]
    assert table.splitlines()[1].split()[7:9] == ["0.01235", "873.1"]  # '@' as MLflow tags spell it: '.' 
    assert table.splitlines()[2].split()[7:9] == ["-", "-"]
    lines = metrics.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "METRIC", "VALUE"]
    assert ["micro", "1", "greedy_agreement", "0.8125"] in [line.split() for line in lines]
    assert len(lines) == 1 + 9 + 3  # every metric of both versions, one a line

    code, out, _ = run_cli("models", "list", "--json", capsys=capsys)
    assert json.loads(out) == _versions()  # every field, unformatted
