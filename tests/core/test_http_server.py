"""The tiny HTTP server behind /metrics: routes, bad requests, HEAD, a failing route."""

from __future__ import annotations

import asyncio

from edgeml.core.http import HttpServer, json_route


async def _ask(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    writer.write_eof()  # a request cut short is seen as such at once
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def test_routes_errors_and_head():
    def boom():
        raise RuntimeError("x")

    async def main() -> None:
        srv = HttpServer("127.0.0.1", 0, {
            "/ok": lambda: (200, "text/plain", b"hello\n"),
            "/ready": json_route(lambda: (False, {"ready": False})),
            "/boom": boom,
        })
        _, port = await srv.start()
        try:
            r = await _ask(port, b"GET /ok?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
            assert r.startswith(b"HTTP/1.1 200 OK") and r.endswith(b"\r\n\r\nhello\n")
            assert b"Content-Length: 6" in r
            r = await _ask(port, b"HEAD /ok HTTP/1.1\r\n\r\n")
            assert r.startswith(b"HTTP/1.1 200") and r.endswith(b"\r\n\r\n")
            r = await _ask(port, b"GET /ready HTTP/1.1\r\n\r\n")
            assert r.startswith(b"HTTP/1.1 503") and r.endswith(b'{"ready": false}\n')
            assert (await _ask(port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(
                b"HTTP/1.1 404")
            assert (await _ask(port, b"POST /ok HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
            assert (await _ask(port, b"\xff\xfe garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
            assert (await _ask(port, b"GET /boom HTTP/1.1\r\n\r\n")).startswith(
                b"HTTP/1.1 500")
            assert await _ask(port, b"GET /ok HTTP/1.1\r\n") == b""  # cut short: closed
            assert srv.errors == 1
        finally:
            await srv.close()

    asyncio.run(main())
