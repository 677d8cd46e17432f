"""A loopback S3 server (moto) and a fault-injecting HTTP proxy in front of it, for the reliability tests.

:class:`FaultProxy` listens on ``127.0.0.1`` and forwards every request to the upstream server unchanged (the Host
header too, so SigV4 signatures still match), except requests that a :class:`FaultRule` matches: those get a
throttling or server error, a connection reset in the middle of the body, or a delay. A rule applies to the first
``count`` matching requests (``count=None``: every one), so "the first N requests to a key fail" is one rule. Every
request is logged with its time and the fault applied, for the tests to check retries and backoff.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

FAULTS = ("slowdown", "internal", "reset", "delay", "trickle", "denied")

_ERROR_BODIES = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
}


@dataclass
class FaultRule:
    """Inject ``fault`` into requests whose decoded path ends with ``key``.

    Attributes:
        key: object key (matched against the end of the URL path); ``""`` matches every request.
        fault: ``slowdown`` (503 SlowDown), ``internal`` (500 InternalError), ``denied`` (403 AccessDenied),
            ``reset`` (headers and half the body, then a TCP reset), ``delay`` (wait ``delay_s``, then forward) or
            ``trickle`` (send the body in 8 pieces, ``delay_s`` apart: a slow transfer that a kill can interrupt).
        count: how many matching requests get the fault; ``None`` for all of them.
        methods: HTTP methods the rule applies to.
        delay_s: the delay of ``delay``.
    """

    key: str
    fault: str
    count: int | None = 1
    methods: tuple[str, ...] = ("GET", "HEAD")
    delay_s: float = 0.0
    applied: int = 0

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {self.fault!r}")


@dataclass(frozen=True)
class LoggedRequest:
    """One request the proxy saw."""

    method: str
    key: str
    time: float
    fault: str | None


@dataclass
class FaultProxy:
    """Threaded HTTP proxy on 127.0.0.1 in front of ``upstream`` (``host:port``)."""

    upstream: tuple[str, int]
    rules: list[FaultRule] = field(default_factory=list)
    log: list[LoggedRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` of the proxy."""
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def requests_for(self, key: str) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.log if r.key.endswith(key)]

    def _choose(self, method: str, key: str) -> FaultRule | None:
        with self._lock:
            for rule in self.rules:
                if (
                    method in rule.methods
                    and key.endswith(rule.key)
                    and (rule.count is None or rule.applied < rule.count)
                ):
                    rule.applied += 1
                    self.log.append(LoggedRequest(method, key, time.monotonic(), rule.fault))
                    return rule
            self.log.append(LoggedRequest(method, key, time.monotonic(), None))
            return None

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output quiet

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                key = unquote(urlsplit(self.path).path)
                rule = proxy._choose(self.command, key)
                if rule is not None and rule.fault in _ERROR_BODIES:
                    self._error(*_ERROR_BODIES[rule.fault])
                    return
                if rule is not None and rule.fault == "delay":
                    time.sleep(rule.delay_s)
                status, reason, headers, payload = self._forward(body)
                if rule is not None and rule.fault == "reset" and self.command != "HEAD" and len(payload) > 1:
                    self._send_head(status, reason, headers)
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                self._send_head(status, reason, headers)
                if self.command == "HEAD":
                    return
                if rule is not None and rule.fault == "trickle":
                    step = max(1, -(-len(payload) // 8))
                    for offset in range(0, len(payload), step):
                        self.wfile.write(payload[offset : offset + step])
                        self.wfile.flush()
                        time.sleep(rule.delay_s)
                    return
                self.wfile.write(payload)

            def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        conn.putheader(name, value)
                    conn.endheaders(body or None)
                    response = conn.getresponse()
                    payload = response.read()
                    return response.status, response.reason, response.getheaders(), payload
                finally:
                    conn.close()

            def _send_head(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
                self.send_response_only(status, reason)
                for name, value in headers:
                    if name.lower() not in {"connection", "transfer-encoding", "keep-alive"}:
                        self.send_header(name, value)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True

            def _error(self, status: int, code: str, message: str) -> None:
                payload = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                    f"<RequestId>FAULTPROXY</RequestId></Error>"
                ).encode()
                self._send_head(
                    status,
                    code,
                    [("Content-Type", "application/xml"), ("Content-Length", str(len(payload)))],
                )
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _reset(self) -> None:
                # SO_LINGER with a zero timeout makes close() send a TCP RST: the client sees a connection reset.
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.close()

            do_GET = _handle  # noqa: N815  (http.server's naming)
            do_HEAD = _handle  # noqa: N815
            do_PUT = _handle  # noqa: N815
            do_POST = _handle  # noqa: N815
            do_DELETE = _handle  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """The shared moto S3 server of :mod:`tests.s3_fixtures` (started on first use); yields its endpoint URL.

    Tests using it create buckets of unique names and do not reset the server.
    """
    from tests.s3_fixtures import shared_server

    yield shared_server().endpoint_url


@contextlib.contextmanager
def fault_proxy(endpoint_url: str) -> Iterator[FaultProxy]:
    """A started :class:`FaultProxy` in front of ``endpoint_url``."""
    parts = urlsplit(endpoint_url)
    assert parts.hostname is not None and parts.port is not None
    proxy = FaultProxy(upstream=(parts.hostname, parts.port)).start()
    try:
        yield proxy
    finally:
        proxy.stop()
