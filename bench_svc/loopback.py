"""The load generator's one safety rule: it only talks to this machine's loopback interface."""

from __future__ import annotations

import ipaddress

__all__ = ["check_loopback"]


def check_loopback(address: str) -> None:
    """Raises ValueError unless `address` (host:port) names this machine's loopback interface."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"address must be a loopback host:port (127.0.0.1, [::1], localhost), got {address!r}")
