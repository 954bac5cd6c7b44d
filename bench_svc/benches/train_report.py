"""What every training benchmark (training, train_compile, train_checkpointing) records beside its numbers: the device, the git commit and the exact command, and
files written whole (temp + rename) so a reader never sees half a CSV."""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from bench_svc.provenance import RunInfo, git_commit, gpu_slug

__all__ = [
    "REPO_ROOT",
    "device_label",
    "device_slug",
    "run_info",
    "run_worker",
    "write_text",
    "write_csv_json",
    "write_results",
    "new_figure",
    "fmt",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def device_label(device: torch.device) -> str:
    """A person's name for the device: the GPU's, or "cpu: <model> x<threads>"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = " " + line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{model} x{torch.get_num_threads()}"


def device_slug(device: torch.device) -> str:
    """The device part of a results file name: "cpu", or the GPU's name as a slug ("nvidia-h100-80gb-hbm3")."""
    return gpu_slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"


def run_info(device: torch.device, module: str, argv: list[str] | None) -> RunInfo:
    """Device, commit, the command as typed (`python -m <module> <args>`), time and torch version."""
    args = sys.argv[1:] if argv is None else argv
    return RunInfo(
        gpu=device_label(device),
        commit=git_commit(),
        command=shlex.join([sys.executable, "-m", module, *args]),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch_version=torch.__version__,
    )


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_csv_json(stem: Path, columns: Iterable[str], rows: list[dict[str, Any]], doc: dict[str, Any]) -> list[Path]:
    """`<stem>.csv` (one row per dict, `columns` in order, other keys left out) and `<stem>.json` (`doc`)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    write_text(csv_path, buf.getvalue())
    write_text(json_path, json.dumps(doc, indent=2) + "\n")
    return [csv_path, json_path]


def write_results(
    stem: Path,
    columns: Iterable[str],
    rows: list[dict[str, Any]],
    doc: dict[str, Any],
    plot: Callable[[Path], Path | None],
) -> list[Path]:
    """`<stem>.csv` and `.json` (write_csv_json), then `<stem>.png` as `plot(path)` draws it; logs the paths."""
    paths = write_csv_json(stem, columns, rows, doc)
    png = plot(stem.with_suffix(".png"))
    paths += [png] if png else []
    log.info("wrote %s", ", ".join(str(path) for path in paths))
    return paths


def run_worker(
    module: str, args: list[str], result: Path, *, env: dict[str, str] | None = None, timeout_s: float | None = None
) -> dict[str, Any]:
    """Run `python -m <module> <args>` from the repo root (one measurement in a fresh process, which writes its
    JSON to `result`) and return that JSON. Raises CalledProcessError / TimeoutExpired."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    subprocess.run([sys.executable, "-m", module, *args], check=True, cwd=REPO_ROOT, env=full_env, timeout=timeout_s)
    return json.loads(result.read_text())


def new_figure(width: float, height: float, **kwargs: Any) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot, no global backend state), or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed; no PNG")
        return None
    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def fmt(value: Any, spec: str) -> str:
    """`value` formatted with `spec`, or "-" when it is None (a table cell)."""
    return "-" if value is None else format(value, spec)
