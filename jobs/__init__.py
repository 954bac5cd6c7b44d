"""The Redis job queue: `queue.JobQueue` (submit, get, list, cancel, watch, dead letters), `worker.Worker`
(claim, heartbeat, retry, dead-letter), `cli.main` (`./tinylm jobs ...`), `testing.RedisServer` for tests."""
