"""`tierserve models list|fetch`: the models known by name (workers/model/registry.py) and their files.

`fetch` joins a chunk-packaged model into the model cache once (size and sha256 checked) and prints its path; the
engine does the same on first use of a name (`--model qwen2.5-coder-0.5b`), so fetching first only moves the wait.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workers.model import registry


def _status(model: registry.RegistryModel, cache_dir: Path) -> dict:
    """One model's row of `models list` (also its --json object)."""
    if isinstance(model, registry.ChunkedModel):
        missing = model.missing_packages()
        assembled = model.is_assembled(cache_dir)
        path = str(model.cached_path(cache_dir)) if assembled else None
        packages = f"{model.package(1)}..{model.num_chunks}=={model.version}"
    else:
        missing = [] if model.is_installed() else [model.package]
        assembled = None  # used where pip put it: nothing to assemble
        path = str(model.path()) if not missing else None
        packages = f"{model.package}=={model.version}"
    return {"name": model.name, "description": model.description, "size_bytes": model.size,
            "packages": packages, "installed": not missing, "missing_packages": missing,
            "assembled": assembled, "path": path}


def cmd_list(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir or registry.default_cache_dir()
    rows = [_status(model, cache_dir) for model in registry.MODELS]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{'NAME':<20} {'SIZE':>9}  {'INSTALLED':<10} {'FILE':<15} DESCRIPTION")
    for row in rows:
        installed = "yes" if row["installed"] else f"no ({len(row['missing_packages'])} missing)"
        if row["assembled"] is None:
            file = "in package" if row["installed"] else "-"
        else:
            file = "assembled" if row["assembled"] else "not assembled"
        print(f"{row['name']:<20} {row['size_bytes'] / 1e6:>6.0f} MB  {installed:<10} {file:<15} {row['description']}")
    print(f"model cache: {cache_dir}", file=sys.stderr)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir or registry.default_cache_dir()
    names = [model.name for model in registry.MODELS] if args.name == "all" else [args.name]
    failed = 0
    for name in names:
        model = registry.get_model(name)
        try:
            path = model.path(cache_dir, progress=_Progress(model.name))
        except (registry.ModelNotInstalledError, registry.ModelIntegrityError) as exc:
            if args.name != "all":
                raise
            print(f"tierserve: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(path)
    return 2 if failed else 0


class _Progress:
    """Assembly progress on stderr, one line per 10%."""

    def __init__(self, name: str):
        self.name = name
        self.shown = -1

    def __call__(self, done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth != self.shown:
            self.shown = tenth
            print(f"[tierserve] assembling {self.name}: {done / 1e6:.0f}/{total / 1e6:.0f} MB", file=sys.stderr)


def add_parser(sub) -> None:
    models = sub.add_parser("models", help="list the models known by name; assemble a chunk-packaged one")
    actions = models.add_subparsers(dest="action", required=True)
    cache_help = f"model cache (default: ${registry.CACHE_ENV} or ~/.cache/tierserve/models)"

    listing = actions.add_parser("list", help="name, size, packages installed?, file assembled?")
    listing.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    listing.add_argument("--cache-dir", type=Path, default=None, help=cache_help)
    listing.set_defaults(func=cmd_list)

    fetch = actions.add_parser("fetch", help="assemble and verify (size + sha256) a model; print its path")
    fetch.add_argument("name", choices=[model.name for model in registry.MODELS] + ["all"],
                       help="a model's name, or all of them")
    fetch.add_argument("--cache-dir", type=Path, default=None, help=cache_help)
    fetch.set_defaults(func=cmd_fetch)

