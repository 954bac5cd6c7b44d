"""The one writer of benchmark results: `<out>/<suite>-<device-slug>.{csv,json,png}`.

Every file starts with the same header block (STYLE.md 13, made by `bench_svc.provenance`): the device the numbers
were measured on, the git commit of the code that measured them (`+dirty` when the tree had changes), the exact
command, the time, the machine's load average, and the anchor: the named baseline measured in the same run that
the other rows are read against. The CSV carries the header as `# key: value` comment lines above the column row;
the JSON as a `header` object beside `rows`.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench_svc.provenance import (
    Anchor,
    RunHeader,
    cpu_device_name,
    device_name,
    device_slug,
    git_commit,
    make_header,
)

__all__ = [
    "Anchor",
    "Panel",
    "PlotSpec",
    "RunHeader",
    "cpu_device_name",
    "device_name",
    "device_slug",
    "git_commit",
    "make_header",
    "read_result",
    "write_results",
]

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Panel:
    """One subplot: `series` pairs a row column with its legend label, drawn against the plot's x column."""

    y_label: str
    series: tuple[tuple[str, str], ...]
    log_y: bool = False


@dataclass(frozen=True)
class PlotSpec:
    """A line plot of some columns of the rows against one column, in one or more side-by-side panels."""

    title: str
    x: str
    x_label: str
    panels: tuple[Panel, ...]
    log_x: bool = False


def write_results(
    out_dir: Path,
    suite: str,
    header: RunHeader,
    rows: Sequence[Row],
    *,
    summary: Mapping[str, Any] | None = None,
    plot: PlotSpec | None = None,
    stem: str | None = None,
) -> list[Path]:
    """Writes `<suite>-<slug>.csv` and `.json` (and `.png` when `plot` is given and there are rows); returns the paths.
    `stem` names the files instead (a benchmark whose README figures name a fixed file, e.g. "jobs-cpu").

    Every row must have the same keys (the CSV columns, in the first row's order). Writes are atomic (temp + rename).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0].keys()) if rows else []
    for i, row in enumerate(rows):
        if list(row.keys()) != columns:
            raise ValueError(f"rows[{i}] has columns {list(row.keys())}, expected {columns}")
    stem = out_dir / (stem or f"{suite}-{device_slug(header.device)}")
    paths = [_write_csv(stem.with_suffix(".csv"), header, columns, rows)]
    png = stem.with_suffix(".png") if plot is not None and rows else None
    document = {
        "suite": suite,
        "header": header.to_dict(),
        "summary": dict(summary or {}),
        "columns": columns,
        "rows": [dict(r) for r in rows],
        "plot": png.name if png else None,
    }
    paths.append(_atomic_write(stem.with_suffix(".json"), json.dumps(document, indent=2, default=_jsonable) + "\n"))
    if png is not None:
        paths.append(_write_png(png, header, rows, plot))
    return paths


def read_result(path: Path) -> dict[str, Any]:
    """A result JSON as written by `write_results`."""
    return json.loads(Path(path).read_text())


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _atomic_write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _write_csv(path: Path, header: RunHeader, columns: list[str], rows: Sequence[Row]) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        for key, value in header.to_dict().items():
            shown = " ".join(value) if key == "command" else (str(header.anchor) if key == "anchor" else value)
            if shown is None:
                continue
            f.write(f"# {key}: {shown}\n")
        writer = csv.DictWriter(f, fieldnames=columns)
        if columns:
            writer.writeheader()
            writer.writerows(rows)
    tmp.replace(path)
    return path


def _write_png(path: Path, header: RunHeader, rows: Sequence[Row], plot: PlotSpec) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: no global figure state, safe in threads

    fig = Figure(figsize=(max(7.0, 5.5 * len(plot.panels)), 4.2), layout="constrained")
    axes = fig.subplots(1, len(plot.panels), squeeze=False)[0]
    xs = [row[plot.x] for row in rows]
    for ax, panel in zip(axes, plot.panels):
        for column, label in panel.series:
            ax.plot(xs, [row[column] for row in rows], marker="o", label=label)
        ax.set_xlabel(plot.x_label)
        ax.set_ylabel(panel.y_label)
        if plot.log_x:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        if panel.log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{plot.title}\n{header.device} @ {header.git_commit[:12]}", fontsize=9)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path
