"""`./tinylm jobs list|show|watch|cancel|retry-dead|dead-letters`: look at and steer the job queue.

Exit codes: 0 ok; 1 not found, failed (a watched job that did not succeed, an unreachable Redis); 2 usage.
"""

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

from google.protobuf.json_format import MessageToDict

from jobs.errors import JobNotFound, QueueUnavailable
from jobs.kinds import KIND_NAMES, kind_name, state_name
from jobs.queue import JobQueue
from jobs.records import DeadLetter
from protos import jobs_pb2

__all__ = ["main"]

_STATES = ["queued", "running", "succeeded", "failed", "cancelled"]


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", help="Redis to use (default: TINYLM_REDIS_URL)")
    common.add_argument("--json", action="store_true", help="machine output: one JSON document (watch: one per line)")
    parser = argparse.ArgumentParser(prog="tinylm jobs", description="Inspect and steer the job queue.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", parents=[common], help="jobs, newest first")
    listing.add_argument("--kind", choices=list(KIND_NAMES.values()))
    listing.add_argument("--state", choices=_STATES)
    listing.add_argument("--limit", type=int, default=50)
    commands.add_parser("show", parents=[common], help="one job's status").add_argument("job_id")
    watch = commands.add_parser("watch", parents=[common], help="follow a job's events until it ends")
    watch.add_argument("job_id")
    watch.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    commands.add_parser("cancel", parents=[common], help="cancel a queued or running job").add_argument("job_id")
    retry = commands.add_parser("retry-dead", parents=[common], help="requeue dead-lettered jobs of a kind")
    retry.add_argument("kind", choices=list(KIND_NAMES.values()))
    retry.add_argument("--job", dest="job_id", default=None, help="only this job")
    dead = commands.add_parser("dead-letters", parents=[common], help="a kind's dead letters")
    dead.add_argument("kind", choices=list(KIND_NAMES.values()))
    return parser


def main(argv: Optional[Sequence[str]] = None, *, default_redis_url: Optional[str] = None) -> int:
    """Run one jobs command; `default_redis_url` is what the caller found in TINYLM_REDIS_URL."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    url = args.redis_url or default_redis_url
    if not url:
        print("tinylm jobs: no Redis: pass --redis-url or set TINYLM_REDIS_URL", file=sys.stderr)
        return 2
    if args.command == "list" and args.limit < 1:
        print(f"tinylm jobs: --limit must be >= 1, got {args.limit}", file=sys.stderr)
        return 2
    try:
        with JobQueue(url) as queue:
            return _COMMANDS[args.command](queue, args)
    except JobNotFound as error:
        print(f"tinylm jobs: {error.args[0]}", file=sys.stderr)
        return 1
    except (QueueUnavailable, TimeoutError) as error:
        print(f"tinylm jobs: {error}", file=sys.stderr)
        return 1


def _list(queue: JobQueue, args: argparse.Namespace) -> int:
    statuses = queue.list(kind=args.kind, state=args.state, limit=args.limit)
    if args.json:
        print(json.dumps([_status_dict(s) for s in statuses], indent=2))
        return 0
    rows = [["ID", "KIND", "STATE", "ATTEMPT", "UPDATED", "ERROR"]]
    for s in statuses:
        rows.append(
            [
                s.job.id,
                kind_name(s.job.kind),
                state_name(s.state),
                str(s.job.attempt),
                _when(s.updated_unix),
                s.error[:60],
            ]
        )
    _print_table(rows)
    return 0


def _show(queue: JobQueue, args: argparse.Namespace) -> int:
    status = queue.get(args.job_id)
    if args.json:
        print(json.dumps(_status_dict(status), indent=2))
        return 0
    spec = getattr(status.job, status.job.WhichOneof("spec") or "noop")
    lines = {
        "id": status.job.id,
        "kind": kind_name(status.job.kind),
        "state": state_name(status.state),
        "attempt": status.job.attempt,
        "worker": status.worker or "-",
        "parent": status.job.parent_id or "-",
        "children": " ".join(status.child_ids) or "-",
        "created": _when(status.job.created_unix),
        "updated": _when(status.updated_unix),
        "spec": json.dumps(MessageToDict(spec, preserving_proto_field_name=True)),
        "error": status.error or "-",
        "result": status.result_json or "-",
    }
    for key, value in lines.items():
        print(f"{key:>9}: {value}")
    return 0


def _watch(queue: JobQueue, args: argparse.Namespace) -> int:
    last = jobs_pb2.JOB_STATE_UNSPECIFIED
    for event in queue.watch(args.job_id, timeout=args.timeout):
        last = event.state
        if args.json:
            print(json.dumps(MessageToDict(event, preserving_proto_field_name=True)), flush=True)
        else:
            done = f"{event.progress:6.1%}" if event.progress >= 0 else "     -"
            print(f"{_when(event.time_unix)}  {state_name(event.state):<9} {done}  {event.message}", flush=True)
    return 0 if last == jobs_pb2.JOB_STATE_SUCCEEDED else 1


def _cancel(queue: JobQueue, args: argparse.Namespace) -> int:
    status = queue.cancel(args.job_id)
    if args.json:
        print(json.dumps(_status_dict(status), indent=2))
    elif status.state == jobs_pb2.JOB_STATE_RUNNING:
        print(f"job {args.job_id}: cancel requested; it stops at its next check")
    else:
        print(f"job {args.job_id}: {state_name(status.state)}")
    return 0


def _retry_dead(queue: JobQueue, args: argparse.Namespace) -> int:
    requeued = queue.retry_dead(args.kind, job_id=args.job_id)
    if args.json:
        print(json.dumps({"requeued": requeued}))
    else:
        print(f"requeued {len(requeued)} job(s)" + "".join(f"\n  {job_id}" for job_id in requeued))
    return 0


def _dead_letters(queue: JobQueue, args: argparse.Namespace) -> int:
    letters = queue.dead_letters(args.kind)
    if args.json:
        print(json.dumps([_dead_letter_dict(d) for d in letters], indent=2))
        return 0
    rows = [["ENTRY", "JOB", "ATTEMPT", "WHEN", "ERROR"]]
    rows += [[d.entry_id, d.job_id or "-", str(d.attempt), _when(d.time_unix), d.error[:80]] for d in letters]
    _print_table(rows)
    return 0


_COMMANDS = {
    "list": _list,
    "show": _show,
    "watch": _watch,
    "cancel": _cancel,
    "retry-dead": _retry_dead,
    "dead-letters": _dead_letters,
}


def _status_dict(status: jobs_pb2.JobStatus) -> dict[str, Any]:
    """The status as JSON, with short kind/state names and the result as an object."""
    out = MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    out["kind"] = kind_name(status.job.kind)
    out["state"] = state_name(status.state)
    out["result"] = json.loads(status.result_json) if status.result_json else None
    return out


def _dead_letter_dict(letter: DeadLetter) -> dict[str, Any]:
    return {
        "entry_id": letter.entry_id,
        "job_id": letter.job_id,
        "error": letter.error,
        "attempt": letter.attempt,
        "time_unix": letter.time_unix,
        "job": None if letter.job is None else MessageToDict(letter.job, preserving_proto_field_name=True),
        "raw_fields": sorted(letter.raw),
    }


def _when(unix: float) -> str:
    if unix <= 0:
        return "-"
    return datetime.datetime.fromtimestamp(unix).isoformat(sep=" ", timespec="seconds")


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_redis_url=os.environ.get("TINYLM_REDIS_URL")))
