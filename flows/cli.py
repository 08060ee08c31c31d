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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factory", description="Hybrid Model Factory")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("validate", help="check a recipe; exit 2 listing bad fields")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_validate)

    p = commands.add_parser("pretrain", help="prepare data and pretrain the recipe's model")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_pretrain)
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
