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
