"""The ``factory`` command line (docs/design.md lists it; the README shows it in use).

Every command imports what it needs when it runs: ``factory validate`` and a fully cached
``factory run`` never import Prefect, and the server starts only when a stage has work to do."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

EXIT_INVALID = 2


def _load_or_exit(path: str):
    from flows.recipe import RecipeError, load_recipe

    try:
        return load_recipe(path)
    except RecipeError as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_INVALID)


def cmd_validate(args) -> int:
    from flows.recipe import explain, summary

    recipe = _load_or_exit(args.recipe)
    print(summary(recipe))
    if args.explain:
        print()
        print(explain(recipe))
    return 0


def _describe(name: str, ref) -> str:
    from model.architectures import format_parameters

    if not hasattr(ref, "digest"):  # a registered version
        return f"{name:<9} {ref.uri}"
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in getattr(ref, "metrics", {}).items() if isinstance(v, int | float))
    if hasattr(ref, "architecture"):
        size = f"{format_parameters(ref.architecture.parameters)} parameters"
    elif hasattr(ref, "gates"):
        size = "; ".join(f"gate {label}: {'passed' if g.passed else 'failed: ' + '; '.join(g.reasons)}"
                         for label, g in ref.gates.items()) or "report"
    else:
        size = getattr(ref, "kind", type(ref).__name__)
    return f"{name:<9} {size}{'; ' + metrics if metrics else ''}  {ref.uri}"


def _run_until(args, until: str) -> int:
    """``factory pretrain|compress|distill``: the stages up to one, earlier ones from cache."""
    from flows import pipeline
    from flows.recipe import summary
    from store import open_store

    recipe = _load_or_exit(args.recipe)
    print(summary(recipe))
    refs = pipeline.run(recipe, open_store(), until=until)
    data = refs.pop("data")
    print(f"data      {data.train_tokens:,} training / {data.validation_tokens:,} validation tokens  {data.uri}")
    for name, ref in refs.items():
        print(_describe(name, ref))
    print(refs[pipeline.result_name(recipe, until)].uri)  # the last line: what the command produced
    return 0


def format_plan(steps) -> str:
    """One line per stage: what compose calls its result, the stage, cached or to run, and why."""
    rows = [(step.name, step.stage, "cached" if step.cached else "to run", step.reason) for step in steps]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows)


def summary_table(refs: dict) -> str:
    """Teacher vs student (and the aligned model): parameters, validation loss, decode speed (what
    `make demo` prints)."""
    from model.architectures import format_parameters

    evaluation = refs.get("evaluation")
    student = refs.get("distilled") or refs.get("student")
    aligned = refs.get("aligned")

    def measured(ref) -> dict:
        label = evaluation.label_of(ref.digest) if evaluation and ref else None
        return evaluation.metrics.get(label, {}) if label else {}

    lines = [f"{'':8} {'parameters':>11} {'val loss':>9} {'decode tok/s':>13}"]
    for label, ref in (("teacher", refs["teacher"]), ("student", student), ("aligned", aligned)):
        if ref is None:
            continue
        m = measured(ref)
        val = m.get("val_loss", ref.metrics.get("val_loss"))
        decode = next((v for k, v in m.items() if k.startswith("decode_tokens_per_s")), None)
        lines.append(f"{label:8} {format_parameters(ref.architecture.parameters):>11} "
                     f"{val if val is None else format(val, '.3f'):>9} {'' if decode is None else format(decode, '.1f'):>13}")
    return "\n".join(lines)


def cmd_run(args) -> int:
    """The whole factory; prints the teacher/student table and the model URI. With every stage
    already stored, it only registers (idempotent) and starts no Prefect server; ``--plan`` says
    what would run, and why, and runs nothing."""
    from flows import pipeline
    from flows.recipe import summary
    from store import open_store

    recipe = _load_or_exit(args.recipe)
    print(summary(recipe))
    pipeline.context_for(recipe)  # this machine's device against the recipe (fp8, cuda) before any server starts
    store = open_store()
    steps = pipeline.plan(recipe, store)
    if args.plan:
        print()
        print(format_plan(steps))
        return 0
    if all(step.cached or not step.cacheable for step in steps):
        print("every stage is stored: registering (idempotent), no flow run needed", file=sys.stderr)
        refs = pipeline.run(recipe, store, until="register")
    else:
        from flows.local_stack import prefect_environment, start_ephemeral_prefect

        prefect_environment()
        start_ephemeral_prefect()
        from flows.factory import factory

        refs = factory(recipe)
    print()
    print(summary_table(refs))
    if (gate := refs["evaluation"].gate_of(pipeline.final_model(refs).digest)) is not None:
        print(f"gate: {'passed' if gate.passed else 'failed: ' + '; '.join(gate.reasons)}")
    print(f"report: {store.fetch(refs['evaluation'].uri)}/report.md")
    print("UIs: `factory up` starts Prefect (flow runs, artifacts) and MLflow (runs, registry) on this machine")
    print(refs[pipeline.result_name(recipe, "register")].uri)
    return 0


def cmd_up(args) -> int:
    """Local Prefect and MLflow servers (and S3 with --s3) in the background; prints what to export."""
    from flows.local_stack import up

    print("starting the local stack (Prefect and MLflow take ~20-60 s each on 2 cores) ...", file=sys.stderr)
    state = up(args.prefect_port, args.mlflow_port, args.s3_port if args.s3 else None)
    for name, server in state["servers"].items():
        print(f"{name:8} {server['url']}   (log: {server['log']})")
    print("\nUIs: Prefect " + state["servers"]["prefect"]["url"] + "   MLflow " + state["servers"]["mlflow"]["url"])
    print("To run flows against them, export:")
    for key, value in state["exports"].items():
        print(f"  export {key}={value}")
    print("Stop them with: factory down")
    return 0


def cmd_down(args) -> int:
    from flows.local_stack import down

    stopped = down()
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop (factory up was not run here)")
    return 0


def cmd_pretrain(args) -> int:
    return _run_until(args, "pretrain")


def cmd_compress(args) -> int:
    return _run_until(args, "compress")


def cmd_distill(args) -> int:
    return _run_until(args, "distill")


def cmd_evaluate(args) -> int:
    return _run_until(args, "evaluate")


def cmd_align(args) -> int:
    return _run_until(args, "align")


def cmd_reward(args) -> int:
    """A reward model (alignment/reward.py) from the recipe's reward_model section."""
    from flows import pipeline
    from store import open_store

    recipe = _load_or_exit(args.recipe)
    if recipe.reward_model is None:
        _fail([("reward_model", "the recipe has no reward_model section")], args.recipe)
    ref = pipeline.reward_model(recipe, pipeline.DirectRunner(open_store(), pipeline.context_for(recipe)))
    print(_describe("reward", ref))
    print(ref.uri)
    return 0


def _fail(problems: list[tuple[str, str]], source: str) -> None:
    print(f"{source}: invalid input", file=sys.stderr)
    for path, message in problems:
        print(f"  {path}: {message}", file=sys.stderr)
    sys.exit(EXIT_INVALID)


def cmd_prune(args) -> int:
    """Prune any Nemotron-H checkpoint folder to a target; every check happens before any work."""
    from pathlib import Path

    from pydantic import ValidationError
    from transformers import AutoConfig

    from compression import importance_stage
    from compression.importance import load_scores
    from compression.prune import prune_checkpoint, score_problems, target_problems
    from compression.spec import ImportanceSpec, PruneTarget
    from flows.pipeline import DirectRunner
    from flows.recipe import validation_problems
    from model import data_stage
    from model.architectures import external_model_ref, format_parameters
    from model.contract import StageContext
    from model.device import DevicePolicy
    from model.spec import DataSpec, TokenizerSpec
    from store import open_store

    model_dir, out_dir = Path(args.model_dir), Path(args.out_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        _fail([("MODEL_DIR", f"not a checkpoint folder: {e}")], str(model_dir))
    raw = Path(args.target).read_text() if Path(args.target).is_file() else args.target
    try:
        target = PruneTarget.model_validate_json(raw)
        data_spec = DataSpec(source=args.data, seq_len=args.seq_len)
    except ValidationError as e:
        _fail([(f"target.{p}" if p and not p.startswith(("source", "seq_len")) else p, m)
               for p, m in validation_problems(e)], args.target)
    problems = [(f"target.{k}" if k != "model" else "MODEL_DIR", v) for k, v in target_problems(config, target).items()]
    if out_dir.exists() and any(out_dir.iterdir()):
        problems.append(("OUT_DIR", f"{out_dir} exists and is not empty; choose a new folder"))
    if problems:
        _fail(problems, str(model_dir))

    teacher = external_model_ref(model_dir)
    if args.scores:
        scores, _ = load_scores(Path(args.scores))
        if bad := score_problems(config, scores, target.layer_metric if target.num_layers is not None else None):
            _fail([("--scores", p) for p in bad], args.scores)
        scores_path = Path(args.scores)
    else:
        store = open_store()
        runner = DirectRunner(store, StageContext(recipe_name="prune", device=DevicePolicy.from_environment()))
        data = runner.run(data_stage, data_stage.DataStageSpec(data=data_spec, tokenizer=TokenizerSpec(path=str(model_dir))), {})
        scores_ref = runner.run(importance_stage, ImportanceSpec(samples=args.samples), {"teacher": teacher, "data": data})
        scores_path = store.fetch(scores_ref.uri) / importance_stage.SCORES_FILE
        scores, _ = load_scores(scores_path)
    summary = prune_checkpoint(model_dir, out_dir, scores, target, {"teacher": str(model_dir.resolve()),
                                                                    "scores": str(scores_path)})
    print(f"pruned {format_parameters(teacher.architecture.parameters)} -> {format_parameters(summary['parameters'])} "
          f"parameters, layers {summary['layer_pattern']}")
    print(f"scores {scores_path} (reuse with --scores)")
    print(out_dir)
    return 0


def _short_number(value: str) -> str:
    """A metric tag (``%.6g`` text) in four significant digits: ``5.25193`` -> ``5.252``."""
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value or "-"


def _count(value: str) -> str:
    from model.architectures import format_parameters

    return format_parameters(int(value)) if value.isdigit() else "-"


def format_models(rows: list[dict], metrics: list[str], all_metrics: bool = False) -> str:
    """``list_models`` rows as one aligned line per version: name, version, aliases, stage, parameters,
    tokens seen, eval status, each of ``metrics`` in its own column (``-`` where a version lacks it) and
    the parent. With ``all_metrics``, a second table lists every metric of every version, one a line."""
    from registry.tracking import metric_name

    columns = [metric_name(m) for m in metrics if m != "tokens_seen"]  # tokens seen has its own column
    header = ["MODEL", "VERSION", "ALIASES", "STAGE", "PARAMS", "TOKENS", "EVAL",
              *(c.upper() for c in columns), "PARENT"]
    right = {1, 4, 5, *range(7, 7 + len(columns))}  # numbers, right-aligned
    table = [header]
    for r in rows:
        table.append([r["name"], r["version"], ",".join(r["aliases"]) or "-", r["stage"] or "-",
                      _count(r["parameters"]), _count(r["tokens_seen"]), r["eval_status"] or "-",
                      *(_short_number(r["metrics"].get(c, "")) for c in columns), r["parent"] or "-"])
    lines = [_aligned(table, right)]
    if all_metrics:
        long = [["MODEL", "VERSION", "METRIC", "VALUE"]]
        long += [[r["name"], r["version"], name, _short_number(value)] for r in rows
                 for name, value in r["metrics"].items()]
        lines += ["", _aligned(long, {1, 3}) if len(long) > 1 else "no metrics recorded"]
    return "\n".join(lines)


def _aligned(table: list[list[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                                for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
                     for row in table)


def cmd_models_list(args) -> int:
    """Every registered version, one aligned line each: aliases, stage, size, tokens, eval status and
    the key metrics (MLFLOW_TRACKING_URI or the embedded default)."""
    import json

    from registry.models import DEFAULT_KEY_METRICS, list_models

    rows = list_models(args.name)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no registered models")
        return 0
    metrics = [m for arg in args.metrics or DEFAULT_KEY_METRICS for m in arg.split(",") if m]
    print(format_models(rows, metrics, args.all_metrics))
    return 0


def cmd_models_get(args) -> int:
    """Download a registered checkpoint (NAME@ALIAS or NAME/VERSION) into OUT_DIR."""
    from registry.models import download_model

    print(download_model(args.model, args.out_dir))
    return 0


def cmd_sdg(args) -> int:
    """Synthetic data (sdg/): prompts, responses, scores and filters -> SFT and preference datasets."""
    from flows import pipeline
    from sdg import sdg_stage
    from store import open_store

    recipe = _load_or_exit(args.recipe)
    if recipe.sdg is None:
        _fail([("sdg", "the recipe has no sdg section")], args.recipe)
    runner = pipeline.DirectRunner(open_store(), pipeline.context_for(recipe))
    ref = runner.run(sdg_stage, recipe.sdg, pipeline.sdg_inputs(recipe, runner))
    steps = ref.metadata["stats"]
    generated = sum(s.get("generated", 0) for s in steps.values())
    reused = sum(s.get("reused", 0) for s in steps.values())
    ranked = ", ".join(f"{k.removeprefix('by_')} {v}" for k, v in steps.get("pairs", {}).items() if k.startswith("by_"))
    print(f"sdg  {ref.metadata['sft_rows']} SFT rows, {ref.metadata['preference_rows']} preference pairs"
          f"{' (' + ranked + ')' if ranked else ''}; {generated} records generated or scored, {reused} reused")
    print(ref.uri)
    return 0


EXIT_GATE_FAILED = 3


def cmd_evaluate_model(args) -> int:
    """Evaluate any checkpoint (folder, s3:// or models:/NAME@ALIAS): metrics.json, report.md, plots.
    (``factory evaluate RECIPE`` is the recipe's evaluate stage; this one needs no recipe.)"""
    from pathlib import Path

    from pydantic import ValidationError

    from evaluation.evaluate import evaluate_folders
    from evaluation.spec import EvaluateSpec
    from flows.recipe import validation_problems
    from model.device import DevicePolicy
    from store import artifact_root, open_store

    def checkpoint(uri: str) -> Path:
        if uri.startswith(("models:/", "s3://")):
            from registry.models import resolve_checkpoint

            return resolve_checkpoint(uri)
        return Path(uri).expanduser()

    recipe = _load_or_exit(args.recipe) if args.recipe else None
    values = (recipe.evaluate if recipe else EvaluateSpec()).model_dump()
    if args.tasks:
        values["tasks"]["names"] = [t for arg in args.tasks for t in arg.split(",") if t]
    if args.sections:
        values["sections"] = [s for arg in args.sections for s in arg.split(",") if s]
    try:
        spec = EvaluateSpec.model_validate(values)
    except ValidationError as e:
        print("factory evaluate-model: invalid options", file=sys.stderr)
        for path, message in validation_problems(e):
            print(f"  {path}: {message}", file=sys.stderr)
        return EXIT_INVALID
    data_dir = Path(args.data) if args.data else None
    if recipe is not None and data_dir is None and "quality" in spec.sections:
        from flows.pipeline import DirectRunner, context_for
        from model import data_stage

        store = open_store()
        data = DirectRunner(store, context_for(recipe)).run(
            data_stage, data_stage.DataStageSpec(data=recipe.data, tokenizer=recipe.tokenizer), {})
        data_dir = store.fetch(data.uri)

    model_dir = checkpoint(args.model)
    label = model_dir.parent.name if model_dir.name == "model" else model_dir.name
    folders = {"teacher": checkpoint(args.teacher)} if args.teacher else {}
    folders[label if label != "teacher" else "candidate"] = model_dir
    out = Path(args.out) if args.out else Path(artifact_root()) / "eval" / label
    evaluation = evaluate_folders(folders, spec, out, "teacher" if args.teacher else None, data_dir,
                                  device_policy=DevicePolicy.from_environment())
    for name, metrics in evaluation.metrics.items():
        shown = {k: v for k, v in metrics.items() if k in ("val_loss", "kl_to_teacher", "greedy_agreement",
                                                          "mqar_accuracy", "passkey_accuracy") or "/acc" in k}
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    for name, gate in evaluation.gates.items():
        verdict = ("pass" if gate.passed else "FAIL") if gate.checks else "no thresholds set"
        print(f"gate {name}: {verdict}" + "".join(f"\n  {r}" for r in gate.reasons))
    print(out / "report.md")
    return 0 if all(g.passed for g in evaluation.gates.values()) else EXIT_GATE_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factory", description="Hybrid Model Factory")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("validate", help="check a recipe; exit 2 listing bad fields")
    p.add_argument("recipe")
    p.add_argument("--explain", action="store_true", help="also list every field with its value and what it means")
    p.set_defaults(func=cmd_validate)

    p = commands.add_parser("run", help="the whole factory flow (Prefect); prints the registered model URI")
    p.add_argument("recipe")
    p.add_argument("--plan", action="store_true",
                   help="print each stage as cached or to run, and why, and run nothing")
    p.set_defaults(func=cmd_run)

    p = commands.add_parser("up", help="start local Prefect and MLflow servers (and S3 with --s3) for the UIs")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--s3", action="store_true", help="also an S3-compatible server (moto) for artifacts")
    p.add_argument("--s3-port", type=int, default=9000)
    p.set_defaults(func=cmd_up)

    p = commands.add_parser("down", help="stop what `factory up` started")
    p.set_defaults(func=cmd_down)

    p = commands.add_parser("evaluate", help="the recipe's stages up to its evaluate stage: teacher and distilled "
                                             "student measured, report and gate (see evaluate-model for any checkpoint)")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("pretrain", help="prepare data and pretrain the recipe's model")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_pretrain)

    p = commands.add_parser("compress", help="importance, search (or a fixed target) and pruning of the teacher")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_compress)

    p = commands.add_parser("distill", help="distill the compressed student from its teacher")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_distill)

    p = commands.add_parser("align", help="SFT then DPO (TRL) of the recipe's model on its synthetic data "
                                          "(runs sdg first when the data is this recipe's)")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_align)

    p = commands.add_parser("reward", help="train the recipe's reward model (a head on a base checkpoint) and "
                                           "measure its accuracy on held-out pairs")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_reward)

    p = commands.add_parser("prune", help="prune a Nemotron-H checkpoint folder to a target (no retraining)")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--target", required=True,
                   help='JSON (or a JSON file): e.g. \'{"hidden_size": 192, "mamba_num_heads": 8, "num_layers": 7}\'')
    p.add_argument("--data", default="builtin:stdlib", help="calibration source (default: the built-in corpus)")
    p.add_argument("--scores", help="reuse saved importance scores instead of calibrating")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration sequence length (default 256)")
    p.set_defaults(func=cmd_prune)

    models = commands.add_parser("models", help="registered models: list, get").add_subparsers(
        dest="models_command", required=True, metavar="ACTION")
    p = models.add_parser("list", help="versions with aliases, key metrics and lineage, one line each")
    p.add_argument("name", nargs="?", help="only this registered model")
    p.add_argument("--metrics", action="append", metavar="M1,M2",
                   help="the metric columns, comma-separated (default: the registry's key metrics, val_loss and "
                        "final_loss; tokens_seen is a column of its own)")
    p.add_argument("--all-metrics", action="store_true",
                   help="also list every metric of every version (the gate's included), one a line")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (every tag, digests included)")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("get", help="download a registered checkpoint into OUT_DIR")
    p.add_argument("model", metavar="NAME@ALIAS", help="NAME@ALIAS or NAME/VERSION (models:/ prefix optional)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.set_defaults(func=cmd_models_get)

    p = commands.add_parser("evaluate-model", help="evaluate any checkpoint, no recipe needed: lm-eval tasks, "
                                                   "recall, efficiency, quality; exit 3 when a gate fails")
    p.add_argument("model", metavar="MODEL", help="a checkpoint folder, s3://... or models:/NAME@ALIAS")
    p.add_argument("--tasks", nargs="+", help="lm-eval task names (default: factory_local, generated offline)")
    p.add_argument("--sections", nargs="+", help="any of quality, tasks, recall, efficiency (default: all)")
    p.add_argument("--out", help="report folder (default: $FACTORY_ARTIFACT_ROOT/eval/<model name>)")
    p.add_argument("--teacher", help="a teacher checkpoint: adds KL, greedy agreement, ratios and the gate")
    p.add_argument("--data", help="a prepared data folder (meta.json + shards) for validation loss")
    p.add_argument("--recipe", help="take the evaluate section (and the data) from this recipe")
    p.set_defaults(func=cmd_evaluate_model)

    p = commands.add_parser("sdg", help="synthetic data: prompts, responses, reward scores, filters -> "
                                        "SFT and preference datasets (resumable per record)")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_sdg)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a clear one-line error; FACTORY_DEBUG=1 shows the traceback
        if os.environ.get("FACTORY_DEBUG"):
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
