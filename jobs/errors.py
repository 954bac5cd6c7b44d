"""Errors the job queue raises to its callers and handlers."""

__all__ = ["JobCancelled", "JobNotFound", "PermanentJobError", "QueueUnavailable"]


class JobNotFound(LookupError):
    """No job with this id exists (maps to gRPC NOT_FOUND)."""


class QueueUnavailable(ConnectionError):
    """Redis did not answer after the bounded retries; the message names the URL."""


class JobCancelled(Exception):
    """Raised inside a handler by `JobContext.check_cancelled()` when the job must stop."""


class PermanentJobError(Exception):
    """Raised by a handler for a failure no retry can fix (a bad spec, a missing or unreadable input): the job fails
    and is dead-lettered at once instead of after `max_attempts` attempts."""
