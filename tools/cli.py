"""The `tinylm` command line: one verb per job, each handed to the `main(argv)` of the package that owns it.

Verbs are imported lazily, so a verb whose package is missing or broken says so without taking the others down.
Exit codes: 0 success, 1 the work failed, 2 bad usage, 3 the verb is not built yet.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

__all__ = ["VERBS", "main"]

EXIT_NOT_BUILT = 3


@dataclass(frozen=True)
class Verb:
    module: str  # module holding `main(argv: list[str]) -> int`
    help: str
    issue: int  # the issue that builds it, for the "not built yet" message


VERBS: dict[str, Verb] = {
    "train": Verb("trainer.main", "train a model (--preset NAME, --config file.yaml, key=value overrides)", 8),
    "export": Verb("exporter.main", "export a model to ONNX / INT8 / INT4 / CoreML / HF, with parity gates", 9),
    "serve": Verb("inference_svc.main", "serve a model over streaming gRPC", 10),
    "generate": Verb("tools.generate", "stream a generation to the terminal (--interactive for a prompt loop)", 10),
    "bench": Verb("bench_svc.main", "run benchmark suites and write results and report.md", 11),
    "jobs": Verb("tools.jobs_verb", "list | show | watch | cancel | retry-dead jobs on the Redis queue", 7),
    "models": Verb("tools.models", "list, show and remove artifacts in the local store", 4),
    "model": Verb("model.info_main", "model info --preset NAME: parameters, FLOPs per token, memory", 4),
    "up": Verb("tools.stack", "start Redis and the four services locally", 11),
    "down": Verb("tools.stack", "stop the local stack", 11),
    "status": Verb("tools.stack", "show the local stack's services and addresses", 11),
    "attention": Verb("tools.attention_map", "write a PNG of attention weights per layer and head", 12),
}


def _list_verbs() -> str:
    return "\n".join(f"  {name:<10} {verb.help}" for name, verb in VERBS.items())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ./tinylm VERB [args]\n\n" + _list_verbs())
        return 0 if argv else 2
    if argv[0] == "--list-verbs":
        print(_list_verbs())
        return 0
    name, rest = argv[0], argv[1:]
    verb = VERBS.get(name)
    if verb is None:
        print(f"tinylm: unknown verb {name!r}; the verbs are: {', '.join(sorted(VERBS))}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(verb.module)
    except ModuleNotFoundError as err:
        if err.name and (verb.module == err.name or verb.module.startswith(err.name + ".")):
            print(
                f"tinylm: `{name}` is not built yet (issue #{verb.issue}: {verb.module} does not exist)",
                file=sys.stderr,
            )
            return EXIT_NOT_BUILT
        raise
    # Verbs that share a module (up/down/status) get their own name as the first argument.
    shared = sum(v.module == verb.module for v in VERBS.values()) > 1
    return int(module.main([name, *rest] if shared else rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
