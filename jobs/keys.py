"""Where the queue keeps things in Redis: one place that names every key.

Layout (prefix "tinylm"):
  tinylm:jobs:<kind>            stream of pending jobs, fields id + job (serialized tinylm.v1.Job)
  tinylm:jobs:<kind>:dead       dead-letter stream: job_id, job, error, attempt, entry (and raw:* for garbage)
  tinylm:jobs:<kind>:delayed    sorted set of job ids waiting out a retry backoff, scored by due time
  tinylm:jobs:<kind>:index      sorted set of every job id of the kind, scored by submission time
  tinylm:jobs:<kind>:idem:<key> idempotency key -> job id
  tinylm:job:<id>               hash: job, kind, state, attempts, worker, error, result, children, ...
  tinylm:job:<id>:events        progress events that Watch calls tail

On Redis Cluster give a hash-tagged prefix ("{tinylm}") so that a job's keys and its stream share a slot.
"""

from dataclasses import dataclass

__all__ = ["KeySpace"]


@dataclass(frozen=True)
class KeySpace:
    """Names of the queue's Redis keys under one prefix."""

    prefix: str = "tinylm"

    def __post_init__(self) -> None:
        if not self.prefix or any(c.isspace() for c in self.prefix):
            raise ValueError(f"prefix must be a non-empty string without spaces, got {self.prefix!r}")

    def stream(self, kind: str) -> str:
        return f"{self.prefix}:jobs:{kind}"

    def dead(self, kind: str) -> str:
        return f"{self.prefix}:jobs:{kind}:dead"

    def delayed(self, kind: str) -> str:
        return f"{self.prefix}:jobs:{kind}:delayed"

    def index(self, kind: str) -> str:
        return f"{self.prefix}:jobs:{kind}:index"

    def idempotency(self, kind: str, key: str) -> str:
        return f"{self.prefix}:jobs:{kind}:idem:{key}"

    @property
    def job_prefix(self) -> str:
        """What precedes a job id in its hash key (scripts that find jobs by id build keys from it)."""
        return f"{self.prefix}:job:"

    def job(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:events"
