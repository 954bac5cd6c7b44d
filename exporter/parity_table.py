"""The parity report as a fixed-width table for people (the JSON report is for machines)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_table"]

_COLUMNS = ("variant", "size", "max|Δlogits|", "greedy agree", "free-running", "val loss", "Δ val loss", "gate")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _gate(entry: dict[str, Any]) -> str:
    if not entry.get("gates"):
        return "not gated"
    if entry["passed"]:
        return "pass"
    return "FAIL " + ", ".join(g["metric"] for g in entry["gates"] if not g["passed"])


def format_table(report: dict[str, Any]) -> str:
    """One row per variant, then the reference line and the verdict."""
    rows = [_COLUMNS]
    for name, v in report["variants"].items():
        agreement, free = v.get("greedy_agreement"), v.get("free_running_agreement")
        rows.append((
            name,
            _size(v.get("bytes", 0)),
            _num(v.get("max_abs_logits"), ".2e"),
            "-" if agreement is None else f"{agreement:.1%}",
            "-" if free is None else f"{free:.1%}",
            _num(v.get("val_loss"), ".4f"),
            _num(v.get("val_loss_delta"), "+.4f"),
            v["skipped"] if "skipped" in v and not v.get("gates") else _gate(v),
        ))  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ref = report["reference"]
    lines.append("")
    lines.append(
        f"PyTorch fp32 val loss {ref['val_loss']:.4f} on {ref['eval_windows']} x {ref['eval_window_tokens']} tokens "
        f"({ref['eval_source']}); greedy agreement over {ref['decode_steps']} decode steps, teacher-forced and "
        f"free-running (the variant's own greedy text, {ref['decode_steps'] + 1} tokens)"
    )
    verdict = "all gates passed" if report["passed"] else "GATE FAILED"
    if not report.get("gated", True):
        verdict += " (--no-gate: files kept" + ("" if report["passed"] else ", marked failed") + ")"
    lines.append(f"model {report['model_id']}: {verdict}")
    return "\n".join(lines)
