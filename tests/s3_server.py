"""moto's S3 server on 127.0.0.1 with a request log and injectable faults, for the push/pull tests.

The server is moto's own ``ThreadedMotoServer`` (the way s3fs's test-suite runs S3); only its WSGI
application is wrapped, so every request still reaches moto, and the tests can ask the *server*
what was sent (``requests``) instead of trusting adapterkit's own counters. Faults act on real
HTTP responses: a body with a flipped byte, or a body cut off mid-stream with the connection closed.

moto keeps its data in the process, not in the server: a second server started in the same process
sees the same buckets, which lets a test stop one server mid-download and carry on with another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from moto.server import ThreadedMotoServer

__all__ = ["Fault", "Request", "S3TestServer"]

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass(frozen=True)
class Request:
    method: str
    #: Path-style: ``/<bucket>/<key>``.
    path: str


@dataclass
class Fault:
    """Damage GET responses for keys ending in ``suffix``: ``"corrupt"`` flips a byte, ``"drop"`` cuts the body."""

    suffix: str
    kind: str  # corrupt | drop
    #: How many more responses to damage (None: every one).
    times: int | None = None
    #: Also drop the ``x-amz-checksum-*`` headers, as a server or proxy without them would: then only the
    #: client's own sha256 check can notice.
    strip_checksums: bool = False
    hits: int = field(default=0)

    def matches(self, method: str, path: str) -> bool:
        return method == "GET" and path.endswith(self.suffix) and (self.times is None or self.hits < self.times)


class _Middleware:
    def __init__(self, app: WsgiApp, server: S3TestServer) -> None:
        self.app = app
        self.server = server

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        with self.server.lock:
            self.server.requests.append(Request(method, path))
            fault = next((f for f in self.server.faults if f.matches(method, path)), None)
            if fault is not None:
                fault.hits += 1
        if fault is None:
            return self.app(environ, start_response)
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured.update(status=status, headers=headers)
            return lambda data: None

        body = b"".join(self.app(environ, capture))
        headers = captured["headers"]
        if fault.strip_checksums:
            headers = [(k, v) for k, v in headers if not k.lower().startswith("x-amz-checksum")]
        start_response(captured["status"], headers)
        if not captured["status"].startswith("2") or not body:
            return [body]
        if fault.kind == "corrupt":
            return [bytes([body[0] ^ 0xFF]) + body[1:]]
        return _cut(body)


def _cut(body: bytes) -> Iterator[bytes]:
    """Send half the body, then fail: werkzeug closes the connection short of the Content-Length."""
    yield body[: len(body) // 2]
    raise ConnectionAbortedError("test fault: connection dropped mid-body")


class S3TestServer(ThreadedMotoServer):
    """A ``ThreadedMotoServer`` on 127.0.0.1 (a free port) that logs requests and can inject faults."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        super().start()
        assert self._server is not None
        self._server.app = _Middleware(self._server.app, self)  # werkzeug serves whatever .app is

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def writes(self, since: int = 0) -> list[Request]:
        """Requests after the ``since``-th that could change an object (PUT, POST, DELETE)."""
        with self.lock:
            return [r for r in self.requests[since:] if r.method in ("PUT", "POST", "DELETE")]

    def mark(self) -> int:
        with self.lock:
            return len(self.requests)
