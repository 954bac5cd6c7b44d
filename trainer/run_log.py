"""What a training run writes for people and machines: a CSV log, TensorBoard scalars and a training-curve PNG.

One CSV row per logged optimizer step (`kind=train`) or evaluation (`kind=eval`). On resume the rows past the
resumed step are dropped, so the log reads as if the run had never stopped. TensorBoard and matplotlib are
optional at run time (the GPU machine may lack them): without them the CSV is still written.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

__all__ = ["RunLog", "CSV_COLUMNS", "read_log", "plot_curve"]

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "step", "kind", "elapsed_s", "lr", "loss", "grad_norm", "dropout", "tokens_per_s", "mfu", "train_loss", "val_loss",
    "val_ppl",
)  # fmt: skip


class RunLog:
    """Appends rows to `<run_dir>/log.csv` and scalars to `<run_dir>/tb/` (when TensorBoard is installed)."""

    def __init__(self, run_dir: Path, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / "log.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_log(self.path) if int(r["step"]) <= resume_step] if resume_step else []
        self._file = self.path.open("w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
        self._csv.writeheader()
        for row in kept:
            self._csv.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
        self._file.flush()
        self._tb = _summary_writer(Path(run_dir) / "tb", resume_step) if tensorboard else None

    def write(self, step: int, kind: str, metrics: dict[str, float]) -> None:
        """One row: `kind` is "train" or "eval"; metrics missing from CSV_COLUMNS go to TensorBoard only."""
        row: dict[str, Any] = {"step": step, "kind": kind}
        row.update({k: _fmt(v) for k, v in metrics.items() if k in CSV_COLUMNS})
        self._csv.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def _summary_writer(folder: Path, resume_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is not installed (e.g. the bare GPU machine)
        log.warning("tensorboard is not installed; writing the CSV log only")
        return None
    # purge_step drops events past the resumed step, like the CSV.
    return SummaryWriter(log_dir=str(folder), purge_step=resume_step or None)


def read_log(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV log, or [] when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_curve(log_path: Path, png_path: Path, *, title: str = "training curve") -> Path | None:
    """Train loss per step and train/val loss per evaluation, to a PNG; None when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed; no training-curve PNG")
        return None
    rows = read_log(log_path)
    steps = [(int(r["step"]), float(r["loss"])) for r in rows if r["kind"] == "train" and r["loss"]]
    evals = [(int(r["step"]), float(r["train_loss"]), float(r["val_loss"])) for r in rows if r["kind"] == "eval"]
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)  # attaches an Agg canvas: no pyplot, no global backend state
    ax = fig.add_subplot()
    if steps:
        ax.plot(*zip(*steps), lw=0.8, alpha=0.6, label="train (per step)")
    if evals:
        s, tr, va = zip(*evals)
        ax.plot(s, tr, "o-", label="train (eval)")
        ax.plot(s, va, "s-", label="val (eval)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    return png_path
