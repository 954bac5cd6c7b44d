"""The load generator's safety rule: loopback addresses only."""

import pytest

from bench_svc.loopback import check_loopback


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "localhost:1", "[::1]:8080", "127.3.2.1:9"])
def test_loopback_addresses_are_accepted(address):
    check_loopback(address)


@pytest.mark.parametrize("address", ["10.0.0.1:50051", "example.com:443", "[2001:db8::1]:1", "0.0.0.0:1"])
def test_other_addresses_are_refused(address):
    with pytest.raises(ValueError, match="loopback"):
        check_loopback(address)
