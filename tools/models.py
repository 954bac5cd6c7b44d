"""`./tinylm models [list | show REF | rm REF]`: the artifacts in the local store ($TINYLM_HOME/artifacts)."""

from __future__ import annotations

import argparse
import json
import sys

from model.artifact import ArtifactError, ArtifactStore
from tools.settings import Settings

__all__ = ["main"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tinylm models", description="List, show and remove model artifacts.")
    parser.add_argument("action", nargs="?", default="list", choices=["list", "show", "rm"])
    parser.add_argument("ref", nargs="?", default=None, help="model id (or unique prefix) or name, for show / rm")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    store = ArtifactStore(Settings.from_env().artifacts)
    if args.action != "list" and not args.ref:
        parser.error(f"{args.action} needs a model id or name")
    try:
        if args.action == "list":
            entries = store.list()
            if args.json:
                print(json.dumps([_summary(e) for e in entries], indent=2))
            elif not entries:
                print(f"no models in {store.root}; train one with ./tinylm train --preset tiny")
            for e in entries if not args.json else []:
                s = _summary(e)
                print(f"{s['id'][:12]}  {s['name']:<24} {s['preset']:<18} val_loss {s['val_loss']}")
        elif args.action == "show":
            path = store.resolve(args.ref)
            manifest = json.loads((path / "manifest.json").read_text())
            print(json.dumps({"path": str(path), **manifest}, indent=2))
        else:
            path = store.resolve(args.ref)
            store.remove(path.name)
            print(json.dumps({"removed": path.name}) if args.json else f"removed {path.name}")
    except ArtifactError as err:
        print(f"tinylm models: {err}", file=sys.stderr)
        return 1
    return 0


def _summary(entry) -> dict:
    manifest = entry if isinstance(entry, dict) else getattr(entry, "manifest", {})
    metrics = manifest.get("metrics", {})
    return {
        "id": manifest.get("id", getattr(entry, "id", "")),
        "name": manifest.get("name", ""),
        "preset": manifest.get("preset", ""),
        "val_loss": metrics.get("val_loss", "-"),
    }
