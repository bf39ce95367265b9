"""The ``efft`` command: train | validate | estimate | ls | cp | config-schema.

Recipe problems are printed as a list (path, value, what is allowed) and exit with status 2,
never with a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

EXIT_BAD_RECIPE = 2

EPILOG = """examples:
  efft train recipes/quickstart.yaml
  efft train quickstart train.learning_rate=1e-4 max_steps=20 optim.name=apollo_mini
  efft validate my.yaml
  efft estimate recipes/llama3-8b-qlora.yaml --gpu-memory 24GB
  efft ls
  efft cp llama3-8b-qlora my-qlora.yaml

Overrides are dotted paths into the recipe (section.key=value), values parsed as YAML;
short forms: lr, max_steps, epochs, batch_size, output_dir, seed."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="efft",
        description="Memory-efficient fine-tuning: run a recipe, check it, or ask whether it fits.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune with a recipe", description="Validate the recipe, load the model, train, write checkpoints and a run card.")
    t.add_argument("recipe", help="recipe YAML path or the name of one in recipes/ (see `efft ls`)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.learning_rate=1e-4")

    v = sub.add_parser("validate", help="check a recipe without loading anything", description="Report every problem in a recipe at once; exit 2 if there are any.")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--print", action="store_true", dest="show", help="print the full recipe with defaults filled in")

    e = sub.add_parser("estimate", help="predict peak memory (no weights loaded)", description="Build the model on the meta device and predict peak memory by category; say whether it fits.")
    e.add_argument("recipe")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--gpu-memory", default=None, help="memory to fit in, e.g. 24GB, 80GiB (default: the recipe's target_gpu_memory)")
    e.add_argument("--nproc-per-node", "--nproc_per_node", "--nproc", dest="nproc_per_node", type=int, default=1,
                   metavar="N", help="processes the run is launched with (torchrun --nproc_per_node N): plan one rank "
                                     "of DDP, or of FSDP2 with train.fsdp (default 1)")
    e.add_argument("--json", action="store_true", help="print the estimate as JSON")

    ls = sub.add_parser("ls", help="list the recipes shipped in recipes/", description="List the shipped recipes with their descriptions.")
    ls.add_argument("--architectures", action="store_true", help="list the model architectures shipped in efft/configs instead")

    c = sub.add_parser("cp", help="copy a shipped recipe to edit", description="Copy recipes/NAME.yaml to DEST.")
    c.add_argument("name")
    c.add_argument("dest")

    sub.add_parser("config-schema", help="print the recipe JSON schema", description="Print the JSON schema of a recipe (for editors and validation).")
    return p


def _bad(err) -> int:
    print(f"efft: {err}", file=sys.stderr)
    return EXIT_BAD_RECIPE


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `efft config-schema | head`: the reader left; no traceback (Python's signal docs)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        from efft import __version__

        print(__version__)
        return 0
    if args.command is None:
        _parser().print_help()
        return 0

    from efft import config

    if args.command == "ls" and args.architectures:
        print("\n".join(config.shipped_architectures()))
        return 0
    if args.command == "ls":
        for path in config.list_recipes():
            import yaml

            try:
                desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
            except yaml.YAMLError:
                desc = "(not valid YAML)"
            first = str(desc).strip().splitlines()[0] if desc else ""
            print(f"{path.stem:<28} {first}")
        return 0
    if args.command == "cp":
        src = config.find_recipe(args.name)
        if src is None:
            names = ", ".join(p.stem for p in config.list_recipes())
            return _bad(f"no recipe named {args.name!r} (available: {names})")
        dest = Path(args.dest)
        if args.dest.endswith(("/", os.sep)):
            dest.mkdir(parents=True, exist_ok=True)
        if dest.is_dir():
            dest = dest / src.name
        if not dest.parent.is_dir():
            return _bad(f"folder {dest.parent} does not exist")
        if dest.exists():
            return _bad(f"{dest} exists; not overwriting")
        shutil.copyfile(src, dest)
        print(f"copied {src.name} -> {dest}")
        return 0
    if args.command == "config-schema":
        print(json.dumps(config.json_schema(), indent=2))
        return 0

    from efft.compose import recipe_problems

    try:  # the plugins' refusals listed with the recipe's cross-section problems, in one round
        recipe = config.load_recipe(args.recipe, args.overrides, weights=args.command != "estimate", checks=recipe_problems)
    except config.RecipeError as err:
        return _bad(err)

    if args.command == "validate":
        print(f"{args.recipe}: ok")
        if args.show:
            import yaml

            print(yaml.safe_dump(config.recipe_to_dict(recipe), sort_keys=False))
        return 0
    if args.command == "estimate":
        from efft.memory import estimate as est

        try:
            limit = args.gpu_memory or recipe.target_gpu_memory
            gpu = est.parse_size(limit) if limit else None
            result = est.estimate(recipe, gpu_memory=gpu, nproc_per_node=args.nproc_per_node)
        except ValueError as err:
            return _bad(err)
        print(json.dumps(result.to_dict(), indent=2) if args.json else result.format_table())
        return 0 if result.fits is not False else 1
    if args.command == "train":
        from efft.train import train

        try:
            train(recipe, recipe_path=args.recipe)
        except config.RecipeError as err:
            return _bad(err)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
