"""The ``factory`` command line (the contract of DESIGN.md)."""

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
    from flows.recipe import summary

    print(summary(_load_or_exit(args.recipe)))
    return 0


def cmd_pretrain(args) -> int:
    from flows.recipe import summary
    from model.architectures import format_parameters
    from model.pretrain import run_prepare_data, run_pretrain
    from registry.store import open_store

    recipe = _load_or_exit(args.recipe)
    print(summary(recipe))
    store = open_store()
    data = run_prepare_data(recipe.data, recipe.tokenizer, store, recipe.name)
    print(f"data   {data.train_tokens:,} training / {data.validation_tokens:,} validation tokens at {data.uri}")
    ref = run_pretrain(recipe.pretrain_spec(), {"data": data}, store)
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in ref.metrics.items())
    print(f"model  {format_parameters(ref.architecture.parameters)} parameters; {metrics}")
    print(ref.uri)
    return 0


def cmd_models_list(args) -> int:
    """Every registered version: aliases, key metrics and lineage (MLFLOW_TRACKING_URI or the embedded default)."""
    import json

    from model.architectures import format_parameters
    from registry.models import list_models

    rows = list_models(args.name)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no registered models")
        return 0
    table = [("MODEL", "VERSION", "ALIASES", "STAGE", "PARAMS", "TOKENS", "PARENT", "EVAL", "METRICS", "DIGEST")]
    for r in rows:
        metrics = " ".join(f"{k}={v}" for k, v in r["metrics"].items() if k != "tokens_seen")
        table.append((r["name"], r["version"], ",".join(r["aliases"]) or "-", r["stage"] or "-",
                      format_parameters(int(r["parameters"])) if r["parameters"].isdigit() else "-",
                      r["tokens_seen"] or "-", r["parent"] or "-", r["eval_status"] or "-", metrics or "-",
                      r["digest"][:12] or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_models_get(args) -> int:
    """Download a registered checkpoint (NAME@ALIAS or NAME/VERSION) into OUT_DIR."""
    from registry.models import download_model

    print(download_model(args.model, args.out_dir))
    return 0


EXIT_GATE_FAILED = 3


def cmd_eval(args) -> int:
    """Evaluate a checkpoint (folder, s3:// or models:/NAME@ALIAS) and write metrics.json, report.md, plots."""
    from pathlib import Path

    from pydantic import ValidationError

    from flows.recipe import validation_problems
    from model.evaluation.spec import EvaluateSpec
    from model.evaluation.stage import evaluate_folders
    from registry.store import artifact_root, open_store

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
        print("factory eval: invalid options", file=sys.stderr)
        for path, message in validation_problems(e):
            print(f"  {path}: {message}", file=sys.stderr)
        return EXIT_INVALID
    data_dir = Path(args.data) if args.data else None
    if recipe is not None and data_dir is None and "quality" in spec.sections:
        from model.pretrain import run_prepare_data

        store = open_store()
        data_dir = store.fetch(run_prepare_data(recipe.data, recipe.tokenizer, store, recipe.name).uri)

    model_dir = checkpoint(args.model)
    label = model_dir.parent.name if model_dir.name == "model" else model_dir.name
    folders = {"teacher": checkpoint(args.teacher)} if args.teacher else {}
    folders[label if label != "teacher" else "candidate"] = model_dir
    out = Path(args.out) if args.out else Path(artifact_root()) / "eval" / label
    evaluation = evaluate_folders(folders, spec, out, "teacher" if args.teacher else None, data_dir)
    for name, metrics in evaluation.metrics.items():
        shown = {k: v for k, v in metrics.items() if k in ("val_loss", "kl_to_teacher", "greedy_agreement",
                                                          "mqar_accuracy", "passkey_accuracy") or "/acc" in k}
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    for name, gate in evaluation.gates.items():
        print(f"gate {name}: {'pass' if gate.passed else 'FAIL'}" + "".join(f"\n  {r}" for r in gate.reasons))
    print(out / "report.md")
    return 0 if all(g.passed for g in evaluation.gates.values()) else EXIT_GATE_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factory", description="Hybrid Model Factory")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("validate", help="check a recipe; exit 2 listing bad fields")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_validate)

    p = commands.add_parser("pretrain", help="prepare data and pretrain the recipe's model")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_pretrain)

    models = commands.add_parser("models", help="registered models: list, get").add_subparsers(
        dest="models_command", required=True, metavar="ACTION")
    p = models.add_parser("list", help="versions with aliases, key metrics and lineage")
    p.add_argument("name", nargs="?", help="only this registered model")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("get", help="download a registered checkpoint into OUT_DIR")
    p.add_argument("model", metavar="NAME@ALIAS", help="NAME@ALIAS or NAME/VERSION (models:/ prefix optional)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.set_defaults(func=cmd_models_get)

    p = commands.add_parser("eval", help="evaluate a checkpoint: lm-eval tasks, recall, efficiency, quality; "
                                         "exit 3 when a gate fails")
    p.add_argument("model", metavar="MODEL", help="a checkpoint folder, s3://... or models:/NAME@ALIAS")
    p.add_argument("--tasks", nargs="+", help="lm-eval task names (default: factory_local, generated offline)")
    p.add_argument("--sections", nargs="+", help="any of quality, tasks, recall, efficiency (default: all)")
    p.add_argument("--out", help="report folder (default: $FACTORY_ARTIFACT_ROOT/eval/<model name>)")
    p.add_argument("--teacher", help="a teacher checkpoint: adds KL, greedy agreement, ratios and the gate")
    p.add_argument("--data", help="a prepared data folder (meta.json + shards) for validation loss")
    p.add_argument("--recipe", help="take the evaluate section (and the data) from this recipe")
    p.set_defaults(func=cmd_eval)
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
