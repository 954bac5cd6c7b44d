"""`report.md`: every result JSON in an output folder gathered into one Markdown page.

Each result gets a section: a header table (device, commit, command, time, load, anchor), its key figures, its rows and
its plot. Results written by `results_io` are read as they are; those written by another package's own benchmark
(the kernels benchmark's `run` block, ...) are read by the usual key names, so one page shows a whole run.
`python -m bench_svc.report DIR` rewrites DIR/report.md.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench_svc.provenance import LOAD_KEYS
from bench_svc.registry import SUITES

__all__ = ["REPORT_NAME", "ResultDoc", "gather", "render", "write_report"]

REPORT_NAME = "report.md"
SUMMARY_SUITE = "summary"
MAX_ROWS = 40


@dataclass(frozen=True)
class ResultDoc:
    """One result file, normalised for the report."""

    path: Path
    suite: str
    header: Mapping[str, Any]  # device, git_commit, command, created, load, anchor
    summary: Mapping[str, Any]
    rows: Sequence[Mapping[str, Any]]
    plot: Path | None


def _first(mapping: Mapping[str, Any], *keys: str, default: Any = "") -> Any:
    for key in keys:
        if key in mapping and mapping[key] not in (None, ""):
            return mapping[key]
    return default


def _normalise(path: Path, doc: Mapping[str, Any]) -> ResultDoc:
    head = doc.get("header") or doc.get("run") or doc.get("meta") or doc.get("info") or doc
    anchor = _first(head, "anchor") or _first(doc, "anchor", "ceilings", "baseline")
    device = _first(head, "device", "gpu")
    if device == "cpu" and head.get("processor"):  # a bare "cpu" with the processor named beside it
        device = f"cpu: {head['processor']}" + (f" x{head['nproc']}" if head.get("nproc") else "")
    header = {
        "device": device,
        "git_commit": _first(head, "git_commit", "commit"),
        "command": _first(head, "command", "argv"),
        "created": _first(head, "created", "timestamp", "time"),
        "load": _first(head, *LOAD_KEYS, default=""),
        "anchor": anchor or "(none stated)",
    }
    suite = str(_first(doc, "suite", default=path.stem.split("-", 1)[0]))
    rows = _first(doc, "rows", "results", default=[])
    rows = [r for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []
    png = path.with_suffix(".png")
    return ResultDoc(path, suite, header, doc.get("summary") or {}, rows, png if png.exists() else None)


def gather(out_dir: Path) -> list[ResultDoc]:
    """Every result JSON in `out_dir` (summary first, then registry order, then by name); unreadable files are skipped."""
    docs = []
    for path in sorted(Path(out_dir).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, Mapping):
            docs.append(_normalise(path, doc))
    order = {name: i for i, name in enumerate([SUMMARY_SUITE, *SUITES])}
    return sorted(docs, key=lambda d: (order.get(d.suite, len(order)), d.path.name))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.4g}"
    elif isinstance(value, Mapping):
        text = _anchor_text(value)
    elif isinstance(value, (list, tuple)):
        text = " ".join(str(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _anchor_text(anchor: Mapping[str, Any]) -> str:
    if "name" in anchor:
        value = anchor.get("value")
        return anchor["name"] if value is None else f"{anchor['name']} = {value:.4g} {anchor.get('unit', '')}".rstrip()
    return ", ".join(f"{k} {_cell(v)}" for k, v in anchor.items())


def _table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    # a list of records (a curve) belongs in the PNG and the JSON, not in a table cell
    columns = list(
        dict.fromkeys(
            k
            for row in rows
            for k, v in row.items()
            if not (isinstance(v, (list, tuple)) and any(isinstance(x, Mapping) for x in v))
        )
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows[:MAX_ROWS]:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    if len(rows) > MAX_ROWS:
        lines.append(f"\n({len(rows) - MAX_ROWS} more rows in the CSV/JSON)")
    return lines


def _section(doc: ResultDoc, out_dir: Path) -> list[str]:
    lines = [f"## {doc.suite}", "", f"`{doc.path.name}`", ""]
    lines += _table([doc.header])
    if doc.summary:
        lines += ["", "Key figures: " + ", ".join(f"{k} **{_cell(v)}**" for k, v in doc.summary.items())]
    if doc.rows:
        lines += [""] + _table(doc.rows)
    if doc.plot is not None:
        lines += ["", f"![{doc.suite}]({os.path.relpath(doc.plot, out_dir)})"]
    return lines + [""]


def render(docs: Sequence[ResultDoc], out_dir: Path) -> str:
    """The Markdown page for `docs`, with links relative to `out_dir`."""
    now = datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")
    lines = [
        "# tinylm benchmark report",
        "",
        f"Gathered {now} from {len(docs)} result file(s) in `{out_dir}`. Every figure was measured on the device and "
        "at the commit its header names, by the command shown; each table is read against its anchor, the baseline "
        "measured in the same run.",
        "",
    ]
    if not docs:
        lines.append("No results yet.")
    for doc in docs:
        lines += _section(doc, out_dir)
    return "\n".join(lines).rstrip() + "\n"


def write_report(out_dir: Path) -> Path:
    """Gathers `out_dir`'s results into `out_dir/report.md` (atomically) and returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_NAME
    tmp = out_dir / f".{REPORT_NAME}.{os.getpid()}.tmp"
    tmp.write_text(render(gather(out_dir), out_dir))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
