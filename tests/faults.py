"""A fault-injecting HTTP reverse proxy for S3 tests (http.server + http.client, on 127.0.0.1).

Forwards every request to a real S3 endpoint (the moto server) unchanged, except those whose
URL-decoded path contains a rule's substring: the first ``times`` of them get the rule's fault.

    with FaultProxy(moto_url) as proxy:
        proxy.add("slow.png", "slowdown", times=2)   # 503 SlowDown twice, then the real object
        proxy.add("gone.png", "reset")               # every GET: socket closed, no response
        ... point boto3 at proxy.url (AWS_ENDPOINT_URL) ...
        proxy.count("slow.png")                      # GETs for it: 3 means retried twice

Faults: "slowdown" (503 SlowDown), "denied" (403 AccessDenied), "nosuchkey" (404 NoSuchKey),
"badkey" (403 InvalidAccessKeyId), "reset" (connection closed with a TCP reset, no response) and
"truncate" (real status and headers, half the body, then the connection closed).
"""

from __future__ import annotations

import http.client
import http.server
import socket
import struct
import threading
import urllib.parse
from dataclasses import dataclass

ERRORS = {  # fault -> (HTTP status, S3 error code, message)
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "denied": (403, "AccessDenied", "Access Denied"),
    "nosuchkey": (404, "NoSuchKey", "The specified key does not exist."),
    "badkey": (403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
}
FAULTS = (*ERRORS, "reset", "truncate")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "proxy-connection",
              "te", "trailer", "upgrade"}


@dataclass
class Rule:
    """Fault ``fault`` for requests with ``method`` whose path contains ``substring``; ``times`` None: always."""

    substring: str
    fault: str
    times: int | None
    method: str


class FaultProxy:
    """A threaded reverse proxy to ``upstream`` that injects faults; a context manager (start/stop)."""

    def __init__(self, upstream: str):
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str]] = []  # (method, URL-decoded path) of every request, in order
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    def add(self, substring: str, fault: str, times: int | None = None, method: str = "GET") -> None:
        """Answer the first ``times`` ``method`` requests whose path holds ``substring`` with ``fault``."""
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
        with self.lock:
            self.rules.append(Rule(substring, fault, times, method))

    def count(self, substring: str, method: str = "GET") -> int:
        """Requests so far with ``method`` whose path held ``substring`` (faulted or forwarded)."""
        with self.lock:
            return sum(m == method and substring in p for m, p in self.requests)

    def match(self, method: str, path: str) -> str | None:
        """Record the request; the fault of the first matching rule that has some left, if any."""
        with self.lock:
            self.requests.append((method, path))
            for rule in self.rules:
                if rule.method == method and rule.substring in path and (rule.times is None or rule.times > 0):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule.fault
            return None

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler class bound to ``proxy``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3; boto3 pools connections
        timeout = 30

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._handle()

        do_PUT = do_POST = do_DELETE = do_HEAD = do_GET  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
            pass

        def _body(self) -> bytes | None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else None

        def _handle(self) -> None:
            body = self._body()
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            fault = proxy.match(self.command, path)
            if fault == "reset":
                # RST, not FIN: SO_LINGER 0 then close; the client sees "connection reset", no response.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return
            if fault in ERRORS:
                status, code, message = ERRORS[fault]
                xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                       f"</Message><Key>{path}</Key><RequestId>fault-proxy</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)
                return
            self._forward(body, truncate=fault == "truncate")

        def _forward(self, body: bytes | None, truncate: bool) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
            finally:
                upstream.close()
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command == "HEAD":
                return
            if truncate:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(data)

    return Handler
