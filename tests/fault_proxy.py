"""A TCP fault proxy for the tests: HTTP on 127.0.0.1 in front of the local S3 server, which drops
connections, stalls, cuts responses short or answers S3 errors for the requests a rule matches.

    proxy = FaultProxy(s3_endpoint)              # then AWS_ENDPOINT_URL=proxy.url
    proxy.add("503", method="PUT", path=r"\\.pt$", times=2)  # the next 2 checkpoint PUTs: SlowDown
    proxy.add("stall", method="GET", path="manifest", seconds=3)
    ...
    proxy.close()

Actions: "500" (InternalError), "503" (SlowDown), "403" (InvalidAccessKeyId: what S3 answers to
bad credentials), "drop" (close without an answer), "reset" (TCP RST), "stall" (hold the request
`seconds`, then close), "truncate" (forward, but cut the response after `limit` bytes). A rule
applies to the next `times` matching requests (None: all of them); requests no rule matches are
forwarded. A rule's `hook` runs when a request matches it, before its action (e.g. to freeze the
server behind the proxy with SIGSTOP just as a checkpoint upload starts). Each connection carries one request: the proxy adds `Connection: close`, so every
request is seen and can be faulted. Loopback only; every socket wait is bounded (IO_TIMEOUT),
stalls by MAX_STALL; `close()` ends everything.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

IO_TIMEOUT = 30.0
MAX_STALL = 60.0
ERRORS = {
    "500": ("500 Internal Server Error", "InternalError", "We encountered an internal error."),
    "503": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
    "403": (
        "403 Forbidden",
        "InvalidAccessKeyId",
        "The AWS Access Key Id you provided does not exist in our records.",
    ),
}
ACTIONS = {*ERRORS, "drop", "reset", "stall", "truncate", "pass"}


@dataclass
class Rule:
    action: str
    method: str | None = None
    path: str | None = None  # regex searched in the request target (path and query)
    times: int | None = 1
    seconds: float = 0.0  # stall
    limit: int = 1024  # truncate: response bytes let through
    hook: Callable[[], None] | None = None  # called when a request matches, before the action
    hits: int = 0

    def matches(self, method: str, target: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method and self.method != method:
            return False
        return not self.path or re.search(self.path, target) is not None


@dataclass
class Seen:
    t: float
    method: str
    target: str
    action: str


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        assert parts.hostname in ("127.0.0.1", "localhost"), "loopback only"
        self.upstream = (parts.hostname, parts.port)
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self._server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._accept.start()

    # ------------------------------------------------------------------ control
    def add(self, action: str, **kw) -> Rule:
        assert action in ACTIONS, action
        rule = Rule(action, **kw)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def faulted(self) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.action != "pass"]

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [
                s
                for s in self.seen
                if (not method or s.method == method) and (not path or re.search(path, s.target))
            ]

    def close(self) -> None:
        self._closed.set()
        self._accept.join(timeout=5)
        self._server.close()
        for t in list(self._threads):
            t.join(timeout=IO_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ serving
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(IO_TIMEOUT)
        try:
            head = _read_head(client)
            if not head:
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target = (request_line.split(" ") + ["", ""])[:2]
            with self._lock:
                rule = next((r for r in self.rules if r.matches(method, target)), None)
                if rule:
                    rule.hits += 1
                action = rule.action if rule else "pass"
                self.seen.append(Seen(time.monotonic(), method, target, action))
            if rule and rule.hook:
                rule.hook()
            if action in ("pass", "truncate"):
                self._forward(client, head, limit=rule.limit if rule else None)
            elif action in ERRORS:
                if b"100-continue" not in head.lower():
                    _drain_body(client, head)
                status, code, message = ERRORS[action]
                body = (
                    b""
                    if method == "HEAD"
                    else (
                        '<?xml version="1.0" encoding="UTF-8"?>\n'
                        f"<Error><Code>{code}</Code><Message>{message}</Message>"
                        "<RequestId>fault-proxy</RequestId></Error>"
                    ).encode()
                )
                client.sendall(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
            elif action == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            elif action == "stall":
                end = time.monotonic() + min(rule.seconds, MAX_STALL)
                while time.monotonic() < end and not self._closed.is_set():
                    readable, _, _ = select.select([client], [], [], 0.1)
                    if readable and not client.recv(65536):
                        break  # the client gave up
            # "drop": close without a word
        except OSError:
            pass
        finally:
            client.close()

    def _forward(self, client: socket.socket, head: bytes, limit: int | None) -> None:
        lines = [
            line
            for line in head.split(b"\r\n")
            if line and not line.lower().startswith((b"connection:", b"keep-alive:"))
        ]
        head = b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n"
        upstream = socket.create_connection(self.upstream, timeout=IO_TIMEOUT)
        try:
            upstream.sendall(head)
            sent_back, open_ends = 0, {client: upstream, upstream: client}
            idle_since = time.monotonic()
            while open_ends and time.monotonic() - idle_since < IO_TIMEOUT:
                if self._closed.is_set():
                    return
                readable, _, _ = select.select(list(open_ends), [], [], 0.2)
                for src in readable:
                    data = src.recv(1 << 18)
                    idle_since = time.monotonic()
                    dst = open_ends[src]
                    if not data:
                        if src is upstream:
                            return  # the response is complete (Connection: close)
                        open_ends.pop(src)
                        dst.shutdown(socket.SHUT_WR)
                        continue
                    if src is upstream and limit is not None:
                        data = data[: max(0, limit - sent_back)]
                        if not data:
                            return  # cut the response short
                    dst.sendall(data)
                    if src is upstream:
                        sent_back += len(data)
        finally:
            upstream.close()


def _read_head(sock: socket.socket) -> bytes:
    """The request line and headers (up to the blank line), leaving the body unread."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(1)  # byte by byte: the body stays in the socket for _forward/_drain
        if not data:
            return b""
        buf += data
        if len(buf) > 65536:
            raise OSError("request head too long")
    return buf


def _drain_body(sock: socket.socket, head: bytes) -> None:
    """Read the request body (Content-Length or chunked) so that an error answer is read by the
    client as an answer, not as a reset while it is still sending."""
    headers = head.lower()
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", headers)
    if m:
        left = int(m.group(1))
        while left > 0:
            data = sock.recv(min(left, 1 << 18))
            if not data:
                return
            left -= len(data)
    elif b"transfer-encoding: chunked" in headers:
        reader = sock.makefile("rb")
        while True:
            size = int(reader.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while reader.readline().strip():  # trailers up to the blank line
                    pass
                return
            reader.read(size + 2)
