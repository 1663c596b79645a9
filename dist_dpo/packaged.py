"""The prepared launch files that ship inside the package, and `dist-dpo configs DIR` to copy them out for editing.

accelerate_configs/ (how to distribute), ds_configs/ (the ZeRO settings the ZeRO yamls point at) and recipes/ (what
to train) live in dist_dpo/; a checkout's top-level folders of the same names are links to them, so a repo user, a
`pip install` user, `doctor` and the launcher all read the same files.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from dist_dpo.errors import UserError

HERE = Path(__file__).resolve().parent
ACCELERATE_CONFIGS = HERE / "accelerate_configs"
DS_CONFIGS = HERE / "ds_configs"
RECIPES = HERE / "recipes"
FOLDERS = (ACCELERATE_CONFIGS, DS_CONFIGS, RECIPES)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def resolve_recipe(name: str) -> Path:
    """A recipe file as given, else the packaged recipe of that name (`seed_qlora` or `seed_qlora.yaml`)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    packaged = RECIPES / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if "/" not in name and packaged.is_file():
        return packaged
    raise UserError(f"recipe file '{name}' does not exist; packaged recipes: {', '.join(recipe_names())} "
                    "(pass one by name, or copy them with `dist-dpo configs DIR`)")


def main(argv: list[str]) -> int:
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2, like every dist-dpo command
            raise UserError(f"configs: {message}")

    p = Parser(prog="dist-dpo configs", description="Copy the prepared accelerate_configs/, ds_configs/ and "
               "recipes/ into DIR for editing. Launch from DIR afterwards: the ZeRO yamls name ds_configs/*.json "
               "relative to it.")
    p.add_argument("dir", help="Where to copy them (created if missing).")
    p.add_argument("--force", action="store_true", help="Overwrite files that already exist there.")
    args = p.parse_args(argv)
    dest = Path(args.dir)
    pairs = [(f, dest / folder.name / f.name) for folder in FOLDERS for f in sorted(folder.iterdir()) if f.is_file()]
    clash = [str(t) for _, t in pairs if t.exists()]
    if clash and not args.force:  # checked before anything is written: all or nothing
        raise UserError(f"configs: {clash[0]} exists ({len(clash)} file(s) would be overwritten); "
                        "pass --force or choose another DIR")
    for src, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    print(f"copied {len(pairs)} files to {dest}/: " + ", ".join(f"{f.name}/" for f in FOLDERS))
    print(f"e.g. cd {dest} && dist-dpo launch zero3 --config recipes/seed_qlora.yaml")
    return 0
