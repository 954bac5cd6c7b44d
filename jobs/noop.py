"""The no-op handler: reports progress, sleeps, and fails on purpose when asked (NoopSpec); for tests and benchmarks."""

import time

from jobs.context import JobContext

__all__ = ["noop_handler"]


def noop_handler(ctx: JobContext) -> dict[str, float]:
    """Emit `steps` progress events `sleep_s` apart; raise RuntimeError(fail_message) on attempts <= fail_attempts."""
    spec = ctx.spec
    if spec.fail_attempts and ctx.attempt <= spec.fail_attempts:
        raise RuntimeError(spec.fail_message or f"failing attempt {ctx.attempt} on purpose")
    for step in range(spec.steps):
        ctx.check_cancelled()
        if spec.sleep_s > 0:
            time.sleep(spec.sleep_s)
        ctx.progress(f"step {step + 1}/{spec.steps}", (step + 1) / spec.steps, step=step + 1)
    return {"steps": spec.steps, "attempt": ctx.attempt}
