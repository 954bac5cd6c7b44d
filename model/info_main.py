"""`tinylm model info --preset NAME [--json]`: what a preset costs (parameters, FLOPs, memory)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from model.presets import PRESETS, get_preset
from model.profile import format_profile, profile_model

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinylm model info", description=__doc__)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model preset")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocab_size")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: block_size)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["info"]:  # `./tinylm model info --preset NAME`: the CLI hands over everything after `model`
        argv = argv[1:]
    args = _parser().parse_args(argv)
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    try:
        config = get_preset(args.preset, **overrides)
        d = profile_model(config, args.batch_size, args.seq_len, dtype=args.dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps({"preset": args.preset, **d}, indent=2)
        if args.json
        else f"preset {args.preset}\n{format_profile(d)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
