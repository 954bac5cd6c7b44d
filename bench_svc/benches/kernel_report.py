"""Write a kernel benchmark run: CSV and JSON for machines, a PNG bar chart and a short table for people.

The kernels' own layout (a `run` block, the ceilings, one row per case), read by `bench_svc.report` as it is.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
from pathlib import Path

from bench_svc.benches.kernel_timing import BenchResult, Ceilings
from bench_svc.provenance import RunInfo

__all__ = ["format_table", "write_results"]

CHART_ROW_HEIGHT_IN = 0.32
CHART_WIDTH_IN = 13.0


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_csv(f, results: list[BenchResult]) -> None:
    fields = [field.name for field in dataclasses.fields(BenchResult)]
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for r in results:
        writer.writerow(dataclasses.asdict(r))


def _write_json(f, results: list[BenchResult], ceilings: Ceilings, info: RunInfo) -> None:
    doc = {
        "run": dataclasses.asdict(info),
        "ceilings": dataclasses.asdict(ceilings),
        "results": [dataclasses.asdict(r) for r in results],
    }
    json.dump(doc, f, indent=2)
    f.write("\n")


def _write_chart(path: Path, results: list[BenchResult], ceilings: Ceilings, info: RunInfo) -> None:
    """Two panels for our kernels: speed-up vs the best PyTorch alternative, and fraction of the ceiling."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    ours = [r for r in results if r.ours]
    labels = [f"{r.kernel} | {r.shape} | {r.impl}" for r in ours]
    height = max(3.0, CHART_ROW_HEIGHT_IN * len(ours) + 1.5)
    fig = Figure(figsize=(CHART_WIDTH_IN, height), layout="constrained")
    ax_speed, ax_frac = fig.subplots(1, 2, sharey=True)
    ys = list(range(len(ours)))
    speed = [r.speedup_vs_best_alt or 0.0 for r in ours]
    ax_speed.barh(ys, speed, color=["tab:green" if s >= 1.0 else "tab:red" for s in speed])
    ax_speed.axvline(1.0, color="black", linewidth=0.8)
    ax_speed.set_yticks(ys, labels, fontsize=8)
    ax_speed.invert_yaxis()
    ax_speed.set_xlabel("speed-up vs best PyTorch alternative (x)")
    frac = [r.frac_of_ceiling or 0.0 for r in ours]
    ax_frac.barh(ys, frac, color="tab:blue")
    ax_frac.set_xlim(0.0, max(1.0, max(frac, default=0.0)))
    ax_frac.set_xlabel(
        f"fraction of ceiling (copy {ceilings.copy_gbps:.0f} GB/s, bf16 mm {ceilings.matmul_tflops:.0f} TFLOP/s)"
    )
    fig.suptitle(f"tinylm kernels on {info.gpu} ({info.commit[:12]}, {info.timestamp})", fontsize=10)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def write_results(
    results: list[BenchResult], ceilings: Ceilings, info: RunInfo, out_dir: Path, stem: str
) -> list[Path]:
    """Write `<stem>.csv`, `<stem>.json` and `<stem>.png` under `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = (out_dir / f"{stem}{ext}" for ext in (".csv", ".json", ".png"))
    _atomic_write(csv_path, lambda f: _write_csv(f, results))
    _atomic_write(json_path, lambda f: _write_json(f, results, ceilings, info))
    _write_chart(png_path, results, ceilings, info)
    return [csv_path, json_path, png_path]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# (header, width, cell of a row); numbers right-aligned, text left-aligned
_COLUMNS = [
    ("kernel", -28, lambda r: r.kernel),
    ("shape", -28, lambda r: r.shape),
    ("impl", -22, lambda r: r.impl + (" *" if r.ours else "")),
    ("ms", 9, lambda r: f"{r.ms:.4f}"),
    ("TFLOP/s", 8, lambda r: _fmt(r.tflops, ".1f")),
    ("GB/s", 6, lambda r: _fmt(r.gbps, ".0f")),
    ("ceil", 5, lambda r: _fmt(r.frac_of_ceiling, ".2f")),
    ("speedup", 7, lambda r: _fmt(r.speedup_vs_best_alt, ".2f")),
    ("peak MiB", 8, lambda r: _fmt(r.peak_mem_mb, ".0f")),
    ("mem x", 5, lambda r: _fmt(r.mem_saving_vs_alt, ".1f")),
]


def _line(cells: list[str]) -> str:
    return " ".join(
        cell[: abs(width)].ljust(-width) if width < 0 else cell.rjust(width)
        for cell, (_, width, _) in zip(cells, _COLUMNS)
    )


def format_table(results: list[BenchResult], ceilings: Ceilings) -> str:
    """The short human table printed at the end of a run."""
    header = _line([name for name, _, _ in _COLUMNS])
    lines = [
        f"ceilings: copy {ceilings.copy_gbps:.0f} GB/s, bf16 8192^3 matmul {ceilings.matmul_tflops:.0f} TFLOP/s",
        header,
        "-" * len(header),
    ]
    lines += [_line([cell(r) for _, _, cell in _COLUMNS]) for r in results]
    lines.append("* ours; speedup = best alternative ms / ours; mem x = lowest alternative peak memory / ours")
    return "\n".join(lines)
