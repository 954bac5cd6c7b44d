"""tools.startup_probe: its tables come from real fresh interpreters (no GPU needed)."""

from tools import startup_probe


def test_heaviest_imports_reads_the_import_tree_and_orders_by_cumulative_time():
    rows = startup_probe.heaviest_imports(["wave", "sqlite3"], top=10_000)
    names = [name for name, _, _ in rows]
    assert names[0] == "torch"  # imported first and the largest: the whole of torch sits under it
    assert "wave" in names and "sqlite3" in names  # top-level imports are read, not only torch's tree
    assert all(cumulative >= own >= 0 for _, cumulative, own in rows)
    assert [c for _, c, _ in rows] == sorted((c for _, c, _ in rows), reverse=True)
    assert "torch._C" in names and not any(name.count(".") > 3 for name in names)  # two levels of the tree only


def test_serial_phases_time_each_import_in_order():
    phases = startup_probe.serial_phases(["wave", "sqlite3"])
    assert [name for name, _ in phases][:3] == ["import torch", "import wave", "import sqlite3"]
    assert all(seconds >= 0 for _, seconds in phases) and phases[0][1] > phases[1][1]
