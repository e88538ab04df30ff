"""A tiny HTTP/1.1 server on the device's event loop: ``GET /metrics`` (Prometheus text),
``/healthz`` (the process and its loop answer) and ``/readyz`` (connected, models loaded and
self-tested). One request per connection, bounded request size and time; no threads, no
``prometheus_client.start_http_server``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

log = logging.getLogger("edgeml.core.http")

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16


class HttpServer:
    """``routes``: path -> callable returning ``(status, content type, body)``."""

    def __init__(self, host: str, port: int,
                 routes: dict[str, Callable[[], tuple[int, str, bytes]]]) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self.requests = 0
        self.errors = 0
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        return sock[0], sock[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                await self._reply(writer, 503, "text/plain", b"busy\n", head=False)
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError):
                return
            if len(head) > MAX_REQUEST_BYTES:
                await self._reply(writer, 431, "text/plain", b"request too large\n")
                return
            try:
                method, target, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
            except (UnicodeDecodeError, ValueError):
                await self._reply(writer, 400, "text/plain", b"bad request\n")
                return
            if method not in ("GET", "HEAD"):
                await self._reply(writer, 405, "text/plain", b"GET only\n")
                return
            route = self.routes.get(target.split("?", 1)[0])
            if route is None:
                await self._reply(writer, 404, "text/plain", b"not found\n")
                return
            self.requests += 1
            try:
                status, ctype, body = route()
            except Exception:
                self.errors += 1
                log.exception("HTTP %s failed", target)
                status, ctype, body = 500, "text/plain", b"internal error\n"
            await self._reply(writer, status, ctype, body, head=method == "HEAD")
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes,
                     head: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 500: "Internal Server Error",
                  503: "Service Unavailable"}.get(status, "")
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        if not head:
            writer.write(body)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)


def json_route(fn: Callable[[], tuple[bool, dict]]) -> Callable[[], tuple[int, str, bytes]]:
    def route() -> tuple[int, str, bytes]:
        ok, doc = fn()
        return (200 if ok else 503), "application/json", json.dumps(doc).encode() + b"\n"
    return route
