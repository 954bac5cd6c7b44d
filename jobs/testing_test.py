"""The throwaway redis-server other services' tests use."""

import pytest

from jobs.testing import RedisServer, RedisServerError


def test_a_server_starts_restarts_on_its_port_and_cleans_up() -> None:
    server = RedisServer(aof=True)
    with pytest.raises(RedisServerError, match="not been started"):
        server.url
    with server:
        client = server.client()
        client.set("k", "v")
        port = server.port
        server.restart()
        assert server.port == port and server.running
        assert client.get("k") == b"v"
        server.stop()
        assert not server.running
        server.start()
        assert server.client().get("k") == b"v"
    assert not server.running and not server.data_dir.exists()


def test_without_persistence_a_restart_forgets() -> None:
    with RedisServer() as server:
        server.client().set("k", "v")
        server.restart()
        assert server.client().get("k") is None


def test_a_missing_redis_server_says_how_to_install_it() -> None:
    with pytest.raises(RedisServerError, match="apt-get install redis-server"):
        RedisServer(executable="/nonexistent/redis-server")
