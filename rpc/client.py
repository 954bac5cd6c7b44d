"""Client channels to tinylm services, with the same TLS and bearer-token options as `rpc.server`."""

from __future__ import annotations

import grpc

__all__ = ["channel"]


class _TokenAuth(grpc.AuthMetadataPlugin):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, context, callback) -> None:
        callback((("authorization", f"Bearer {self._token}"),), None)


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token on a plaintext channel (gRPC only sends call credentials over TLS)."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        return _Details(details, list(details.metadata or []) + [self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


def channel(address: str, *, tls_ca: bytes | None = None, token: str | None = None) -> grpc.Channel:
    """A channel to `address` (host:port); TLS when `tls_ca` is given, a bearer token when `token` is."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if tls_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(_TokenAuth(token)))
        return grpc.secure_channel(address, creds, options=options)
    ch = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(ch, _TokenInterceptor(token)) if token else ch
