"""The jobs suite runs the queue benchmark as a child process and collects its files into the run's folder."""

from bench_svc import jobs_throughput
from bench_svc.report import gather


def test_quick_jobs_suite_collects_the_queue_benchmark(tiny_ctx):
    result = jobs_throughput.run(tiny_ctx)
    assert result.ok, result.status
    names = sorted(p.name for p in result.files)
    assert any(n.endswith(".json") for n in names) and any(n.endswith(".csv") for n in names)
    assert all(p.parent == tiny_ctx.out_dir for p in result.files)
    assert names == ["jobs-cpu.csv", "jobs-cpu.json", "jobs-cpu.png"]
    docs = [d for d in gather(tiny_ctx.out_dir) if d.suite == "jobs"]
    assert docs and docs[0].rows and all(row["jobs_per_s"] > 0 for row in docs[0].rows)
    header = docs[0].header  # stamped by the harness's provenance, not by the queue package
    assert (
        header["device"].startswith("cpu: ")
        and header["git_commit"]
        and "bench_svc.benches.jobs_queue" in " ".join(header["command"])
    )
