"""The upstream HTTP/1.1 client (`providers/_client.py`), against a real server on loopback that
answers with bytes each test writes: framing, keep-alive, the pool's bound, timeouts, TLS, and
what a misbehaving upstream gets."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import socket
import ssl
import struct
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from llmrouter.errors import UpstreamTimeout, UpstreamUnavailable
from llmrouter.providers import _client, _http
from llmrouter.settings import Timeouts

# A handler reads one request (its head and body, as bytes) and writes what it likes.
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Served"], Awaitable[None]]


class Served:
    """What the server saw: the connections it accepted and the requests read on them."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []


async def read_request(reader: asyncio.StreamReader, served: Served) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    request = head + (await reader.readexactly(length) if length else b"")
    served.requests.append(request)
    return request


def answer(body: bytes, *, status: str = "200 OK", headers: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{headers}\r\n"
    ).encode() + body


async def serve(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> tuple[Any, int, Served]:
    served = Served()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.connections += 1
        try:
            await handler(reader, writer, served)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connected, "127.0.0.1", 0, ssl=ssl_context)
    return server, server.sockets[0].getsockname()[1], served


def keep_answering(body: bytes = b'{"ok":true}') -> Handler:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        while True:
            await read_request(reader, served)
            writer.write(answer(body))
            await writer.drain()

    return handler


class Upstream:
    """The transport under test, and the URL of the server it is to ask."""

    def __init__(self, transport: _http.HttpTransport, url: str) -> None:
        self.transport = transport
        self.url = url

    async def send(self, body: bytes = b"{}", **timeouts: float) -> _http.Response:
        request = _http.Request("POST", self.url, body, {"content-type": "application/json"})
        return await self.transport.send(request, Timeouts(**timeouts))


def run(test: Callable[[Upstream], Awaitable[Any]], handler: Handler, **kw: Any) -> tuple[Any, Served]:
    """`test(upstream)` against a server of `handler`, on a transport of `kw`'s settings."""

    async def main() -> tuple[Any, Served]:
        server, port, served = await serve(handler, kw.pop("ssl_context", None))
        transport = _http.HttpTransport("p", max_connections=kw.pop("limit", 8))
        url = f"{kw.pop('scheme', 'http')}://127.0.0.1:{port}/v1/x"
        await transport.start()
        try:
            return await test(Upstream(transport, url)), served
        finally:
            await transport.aclose()
            server.close()

    return asyncio.run(main())


async def post(upstream: Upstream, body: bytes = b"{}", **timeouts: float) -> bytes:
    response = await upstream.send(body, **timeouts)
    return await _http.read_whole(response, lambda r, b: UpstreamUnavailable(f"{r.status} {b!r}"))


def test_requests_go_one_after_another_on_one_kept_alive_connection() -> None:
    async def test(transport: Upstream) -> list[bytes]:
        return [await post(transport, b'{"n":%d}' % i) for i in range(5)]

    bodies, served = run(test, keep_answering())
    assert bodies == [b'{"ok":true}'] * 5
    assert served.connections == 1
    first = served.requests[0]
    assert first.startswith(b"POST /v1/x HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"content-length: 7\r\n" in first and first.endswith(b'\r\n\r\n{"n":0}')
    assert b"accept-encoding" not in first.lower() and b"cookie" not in first.lower()


def test_a_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    async def test(transport: Upstream) -> None:
        request = _http.Request("POST", transport.url, b"{}", {"x-a": "1\r\nx-injected: 2"})
        with pytest.raises(UpstreamUnavailable, match="ValueError"):
            await transport.transport.send(request, Timeouts())

    _, served = run(test, keep_answering())
    assert served.requests == []


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s"
        % (len(gzip.compress(b"hello world")), gzip.compress(b"hello world")),
        b"HTTP/1.1 200 OK\r\ncontent-encoding: deflate\r\ncontent-length: %d\r\n\r\n%s"
        % (len(zlib.compress(b"hello world")), zlib.compress(b"hello world")),
        b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world",
    ],
    ids=["chunked", "gzip", "deflate", "early-hints"],
)
def test_bodies_framed_and_encoded_every_way_are_read_whole_and_the_connection_kept(raw: bytes) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        while True:
            await read_request(reader, served)
            for i in range(0, len(raw), 7):  # in small pieces, as a slow network gives them
                writer.write(raw[i : i + 7])
                await writer.drain()
                await asyncio.sleep(0)

    async def test(transport: Upstream) -> list[bytes]:
        return [await post(transport), await post(transport)]

    bodies, served = run(test, handler)
    assert bodies == [b"hello world"] * 2
    assert served.connections == 1


def test_a_body_that_ends_with_the_connection_is_whole_and_the_connection_not_reused() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        await read_request(reader, served)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhello ")
        await writer.drain()
        writer.write(b"world")

    async def test(transport: Upstream) -> list[bytes]:
        return [await post(transport), await post(transport)]

    bodies, served = run(test, handler)
    assert bodies == [b"hello world"] * 2
    assert served.connections == 2


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello",  # then the connection closes
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 5\r\n\r\nhello",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"",
    ],
    ids=["short-length", "short-chunks", "brotli-not-asked", "bad-gzip", "not-http", "closed"],
)
def test_a_broken_answer_is_the_deployment_s_failure_and_its_connection_dropped(raw: bytes) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        await read_request(reader, served)
        writer.write(raw)
        await writer.drain()

    async def test(transport: Upstream) -> None:
        for _ in range(2):
            with pytest.raises(UpstreamUnavailable, match="Provider p"):
                await post(transport)

    _, served = run(test, handler)
    assert served.connections == 2  # (nothing is reused after a failure)


def test_a_kept_connection_the_upstream_closed_unanswered_is_the_attempt_s_failure_not_resent() -> None:
    """The upstream's idle timeout and our next request crossing, or an upstream that reads a
    request and drops it: the request may have been acted on, so it is not sent again here (the
    executor, the one owner of retries, counts the attempt and decides)."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        if served.connections == 1:
            await read_request(reader, served)
            writer.write(answer(b"one"))
            await writer.drain()
            await read_request(reader, served)  # the second request on it: closed unanswered
            return
        await keep_answering(b"three")(reader, writer, served)

    async def test(transport: Upstream) -> list[bytes]:
        first = await post(transport)
        with pytest.raises(UpstreamUnavailable, match="unreachable: ProtocolError"):
            await post(transport)
        return [first, await post(transport)]

    bodies, served = run(test, handler)
    assert bodies == [b"one", b"three"]
    assert served.connections == 2 and len(served.requests) == 3


def test_no_answer_in_time_is_a_timeout_and_its_connection_is_not_reused() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        await read_request(reader, served)
        if len(served.requests) == 1:
            await asyncio.sleep(1)  # (the answer, late, would be taken for the next request's)
        writer.write(answer(b"late" if len(served.requests) == 1 else b"next"))
        await writer.drain()
        await keep_answering(b"next")(reader, writer, served)

    async def test(transport: Upstream) -> bytes:
        with pytest.raises(UpstreamTimeout):
            await post(transport, first_token=0.1)
        return await post(transport)

    body, served = run(test, handler)
    assert body == b"next" and served.connections == 2


def test_a_body_slower_than_the_attempt_s_total_time_is_a_timeout() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        await read_request(reader, served)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(20):
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    async def test(transport: Upstream) -> None:
        response = await transport.send(total=0.3)
        pieces: list[bytes] = []

        async def read_all() -> None:
            while piece := await response.chunk(10):  # each piece within its wait, the whole not
                pieces.append(piece)

        with pytest.raises(UpstreamTimeout):
            await read_all()
        response.release()
        assert 3 <= len(pieces) <= 8

    run(test, handler)


def test_the_pool_opens_at_most_its_limit_and_every_request_is_answered() -> None:
    open_now = 0
    most = 0

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        try:
            while True:
                await read_request(reader, served)
                await asyncio.sleep(0.01)
                writer.write(answer(b"ok"))
                await writer.drain()
        finally:
            open_now -= 1

    async def test(transport: Upstream) -> list[bytes]:
        return list(await asyncio.gather(*(post(transport) for _ in range(20))))

    bodies, served = run(test, handler, limit=3)
    assert bodies == [b"ok"] * 20
    assert most == 3 and served.connections == 3


def test_a_request_cancelled_before_its_answer_leaves_its_connection_behind() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        if served.connections == 1:
            await read_request(reader, served)
            await asyncio.sleep(0.2)
            writer.write(answer(b"for the cancelled one"))  # (would be taken for the next one's)
            await writer.drain()
        await keep_answering(b"fresh")(reader, writer, served)

    async def test(transport: Upstream) -> bytes:
        task = asyncio.ensure_future(post(transport))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await post(transport)

    body, served = run(test, handler)
    assert (body, served.connections) == (b"fresh", 2)


def test_an_answer_nobody_asked_for_ends_an_idle_connection() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        if served.connections == 1:
            await read_request(reader, served)
            writer.write(answer(b"one") + answer(b"stray"))  # two answers to one request
            await writer.drain()
        await keep_answering(b"two")(reader, writer, served)

    async def test(transport: Upstream) -> list[bytes]:
        first = await post(transport)
        await asyncio.sleep(0.05)
        return [first, await post(transport)]

    bodies, served = run(test, handler)
    assert bodies == [b"one", b"two"] and served.connections == 2


def test_a_large_body_is_read_whole_through_the_paused_reads() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB, well past the point where reading pauses
    handler = keep_answering(big)

    async def test(transport: Upstream) -> list[int]:
        sizes = []
        for _ in range(2):
            response = await transport.send()
            await asyncio.sleep(0.1)  # the body arrives faster than it is read
            got = bytearray()
            while piece := await response.chunk(5):
                got += piece
            response.release()
            assert got == big
            sizes.append(len(got))
        return sizes

    sizes, served = run(test, handler)
    assert sizes == [len(big)] * 2 and served.connections == 1

    async def whole(transport: Upstream) -> list[bytes]:
        return [await post(transport, total=5), await post(transport, total=5)]  # (read whole)

    bodies, served = run(whole, handler)
    assert bodies == [big] * 2 and served.connections == 1


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made with `cryptography`, one of our own)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    where = tmp_path_factory.mktemp("tls")
    cert_path, key_path = where / "cert.pem", where / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_https_is_verified_against_the_trusted_certificates(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def test(transport: Upstream) -> list[bytes]:
        return [await post(transport), await post(transport)]

    # Not trusted: the certificate is refused, and the request is the deployment's failure.
    async def refused(transport: Upstream) -> None:
        with pytest.raises(UpstreamUnavailable, match="SSLCertVerificationError"):
            await post(transport)

    run(refused, keep_answering(), ssl_context=server_context, scheme="https")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted, as a private CA would be
    bodies, served = run(test, keep_answering(), ssl_context=server_context, scheme="https")
    assert bodies == [b'{"ok":true}'] * 2 and served.connections == 1


def test_headers_are_looked_up_in_any_case() -> None:
    headers = _client.Headers({"Retry-After": "2"})
    assert (
        headers.get("retry-after") == "2" and headers["RETRY-AFTER"] == "2" and "retry-AFTER" in headers
    )
    assert headers.get("x") is None


# -- what the attack review of the client found (each failed before its fix) -------------------


def pool_run(
    test: Callable[[_client.Pool, str], Awaitable[Any]], handler: Handler, limit: int = 4
) -> Any:
    """`test(pool, url)` on a `_client.Pool` of `limit` against a server of `handler`."""

    async def main() -> Any:
        server, port, _ = await serve(handler)
        pool = _client.Pool(limit=limit)
        try:
            return await asyncio.wait_for(test(pool, f"http://127.0.0.1:{port}/"), 20)
        finally:
            await pool.aclose()
            server.close()

    return asyncio.run(main())


async def ask(
    pool: _client.Pool, url: str, within: float = 5, body: bytes = b"{}"
) -> _client.ClientResponse:
    deadline = asyncio.get_running_loop().time() + within
    return await pool.request("POST", url, {}, body, connect=2, deadline=deadline)


def later(seconds: float = 5) -> float:
    return asyncio.get_running_loop().time() + seconds


def test_a_failed_connect_gives_its_turn_to_the_next_waiter() -> None:
    async def test(pool: _client.Pool, url: str) -> bytes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            refused = f"http://127.0.0.1:{s.getsockname()[1]}/"  # (bound, not listening)
        a = asyncio.ensure_future(ask(pool, refused))
        b = asyncio.ensure_future(ask(pool, url, within=3))
        with pytest.raises(ConnectionRefusedError):
            await a
        started = asyncio.get_running_loop().time()
        response = await b
        assert asyncio.get_running_loop().time() - started < 1
        return await response.read(later())

    assert pool_run(test, keep_answering(b"b"), limit=1) == b"b"


def test_a_waiter_woken_and_cancelled_passes_its_turn_on() -> None:
    async def test(pool: _client.Pool, url: str) -> bytes:
        x = await ask(pool, url)
        await x.read(later())
        a = asyncio.ensure_future(ask(pool, url, within=3))
        b = asyncio.ensure_future(ask(pool, url, within=3))
        await asyncio.sleep(0.05)  # both wait for the one connection
        x.release()  # it goes idle, which wakes a, whose client leaves in the same moment
        a.cancel()
        response = await b
        return await response.read(later())

    assert pool_run(test, keep_answering(b"b"), limit=1) == b"b"


@pytest.mark.parametrize("how", ["reset", "our-close"])
def test_a_body_framed_by_the_close_and_cut_short_is_an_error(how: str) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        await read_request(reader, served)
        writer.write(b'HTTP/1.1 200 OK\r\n\r\n{"partial": ')
        await writer.drain()
        await asyncio.sleep(0.1)
        if how == "reset":  # an RST, not a FIN: closed with a zero linger
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        await asyncio.sleep(2)

    async def test(pool: _client.Pool, url: str) -> None:
        response = await ask(pool, url)
        if how == "our-close":
            asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(pool.aclose()))
        with pytest.raises(_client.ProtocolError):
            await response.read(later())

    pool_run(test, handler)


def test_read_with_a_limit_over_the_pause_mark_gets_its_limit() -> None:
    big = b"x" * (2 << 20)

    async def test(pool: _client.Pool, url: str) -> int:
        response = await ask(pool, url)
        got = await response.read(later(3), 1 << 20)
        response.release()
        return len(got)

    assert pool_run(test, keep_answering(big)) == 1 << 20


def gzip_answer(body: bytes, *, cut: int | None = None, encoding: str = "gzip") -> Handler:
    packed = gzip.compress(body)[:cut]

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        await read_request(reader, served)
        head = (
            f"HTTP/1.1 200 OK\r\ncontent-encoding: {encoding}\r\ncontent-length: {len(packed)}\r\n\r\n"
        )
        writer.write(head.encode() + packed)
        await writer.drain()
        await asyncio.sleep(1)

    return handler


def test_a_compressed_body_decodes_a_bounded_amount_at_a_time() -> None:
    bomb = bytes(64 << 20)  # 64 MiB of zeros: some 65 KB compressed

    async def test(pool: _client.Pool, url: str) -> tuple[int, int]:
        response = await ask(pool, url)
        first = await response.read(later(), 64 * 1024)
        response.release()
        response = await ask(pool, url)
        piece = await response.chunk(later())
        response.release()
        return len(first), len(piece)

    first, piece = pool_run(test, gzip_answer(bomb))
    assert first == 64 * 1024 and piece <= _client._HIGH_WATER


def test_a_compressed_body_cut_short_is_an_error_and_its_end_read_twice_is_empty() -> None:
    text = bytes(range(256)) * 256

    async def cut(pool: _client.Pool, url: str) -> None:
        response = await ask(pool, url)
        with pytest.raises(_client.ProtocolError):
            await response.read(later())

    pool_run(cut, gzip_answer(text, cut=len(gzip.compress(text)) // 2))

    async def twice(pool: _client.Pool, url: str) -> bytes:
        response = await ask(pool, url)
        got = b""
        while piece := await response.chunk(later()):
            got += piece
        assert await response.chunk(later()) == b"" and await response.read(later()) == b""
        return got

    assert pool_run(twice, gzip_answer(text)) == text


def test_an_encoding_not_asked_for_gives_nothing_of_its_body() -> None:
    async def test(pool: _client.Pool, url: str) -> None:
        response = await ask(pool, url)
        with pytest.raises(_client.ProtocolError, match="encoding not asked for"):
            await response.chunk(later())

    pool_run(test, gzip_answer(b"hi", encoding="br"))


def test_an_answer_followed_at_once_by_the_close_leaves_no_dead_connection_in_the_pool() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        await read_request(reader, served)
        writer.write(answer(b"ok"))  # (keep-alive by default, and then closed: its last request)

    async def test(pool: _client.Pool, url: str) -> int:
        failed = 0
        for _ in range(20):
            first = await ask(pool, url)
            await first.read(later())
            first.release()  # at once, as read_whole does: the FIN is in the socket already
            try:
                second = await ask(pool, url)
                await second.read(later())
                second.release()
            except (OSError, _client.ProtocolError):
                failed += 1
        return failed

    assert pool_run(test, handler) == 0


def test_a_connection_whose_request_is_still_being_written_is_not_reused() -> None:
    """An upstream that answers on the head alone (a 413) and keeps the connection: the rest of
    the body still to write would go out ahead of the next request, and be read as one."""
    parsed: list[bytes] = []

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            parsed.append(head.split(b"\r\n")[0])
            if len(parsed) == 1:
                writer.write(b"HTTP/1.1 413 Too Large\r\ncontent-length: 0\r\n\r\n")  # (body unread)
            else:
                writer.write(answer(b"next"))
            await writer.drain()

    async def test(pool: _client.Pool, url: str) -> bytes:
        prompt = (
            b'{"prompt":"' + b"a" * (4 << 20) + b'\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"}'
        )
        response = await ask(pool, url, body=prompt)
        await response.read(later())
        response.release()
        second = await ask(pool, url)
        return await second.read(later())

    assert pool_run(test, handler, limit=1) == b"next"
    assert b"GET /smuggled HTTP/1.1" not in parsed


def test_an_answer_s_head_is_bounded_and_read_in_linear_time() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        await read_request(reader, served)
        writer.write(
            b"HTTP/1.1 200 OK\r\n" + b"x-a: " + b"v" * 100 + b"\r\n" * 1 + b"x-a: v\r\n" * 50_000
        )
        await writer.drain()
        await asyncio.sleep(2)

    async def test(pool: _client.Pool, url: str) -> float:
        started = asyncio.get_running_loop().time()
        with pytest.raises(_client.ProtocolError, match="head over"):
            await ask(pool, url)
        return asyncio.get_running_loop().time() - started

    assert pool_run(test, handler) < 1.0


@pytest.mark.parametrize(
    "headers",
    [{"Content-Length ": "1"}, {"Transfer-Encoding\t": "chunked"}, {"": "x"}, {"x-a b": "1"},
     {"x-key": "a\x00b"}, {"x-key": "a\x0bb"}],
    ids=["length-space", "encoding-tab", "empty", "space", "nul", "vertical-tab"],
)  # fmt: skip
def test_request_headers_are_fields_or_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="not a valid field"):
        _client._head(_client._origin("POST", "http://h/x"), headers, b"{}")


@pytest.mark.parametrize(
    "url", ["http://h/a\x00b", "http://h/a b", "http://h/?q=\x7f", "http://u:p@h/x"]
)
def test_urls_with_control_characters_or_credentials_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"control character|credentials"):
        _client._origin("POST", url)


def test_a_configured_host_header_is_the_one_sent() -> None:
    head = _client._head(_client._origin("POST", "http://10.0.0.1:8080/x"), {"Host": "api.example"}, b"")
    assert head.count(b"host:") == 1 and b"\r\nhost: api.example\r\n" in head


def test_a_stream_whose_end_came_with_its_last_event_is_given_back_without_a_drain() -> None:
    """The usual case: the body's end arrives with `[DONE]`. `finish()` gives the connection back
    there and then (no task reads on in the background), and the next request reuses it."""
    events = b"data: one\n\ndata: [DONE]\n\n"
    stream_answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(events), events)
    )

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        while True:
            await read_request(reader, served)
            writer.write(stream_answer)  # (the whole answer in one write)
            await writer.drain()

    async def test(upstream: Upstream) -> list[bool]:
        drained = []
        for _ in range(3):
            response = await upstream.send()
            await asyncio.sleep(0.05)  # the whole answer is in by now
            stream = _http.EventStream(response, first=1, idle=1, provider="p")
            batch = await anext(stream)
            assert [e.data for e in batch] == [b"one", b"[DONE]"]
            stream.finish()
            drained.append(bool(_http._DRAINING))
        return drained

    drained, served = run(test, handler)
    assert drained == [False, False, False]
    assert served.connections == 1


def test_finish_before_the_body_s_end_leaves_the_connection_to_the_drain() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: Served
    ) -> None:
        await read_request(reader, served)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: x\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await read_request(reader, served)
        writer.write(answer(b"again"))
        await writer.drain()

    async def test(upstream: Upstream) -> tuple[bool, bytes]:
        response = await upstream.send()
        stream = _http.EventStream(response, first=1, idle=1, provider="p")
        assert [e.data for e in await anext(stream)] == [b"x"]
        stream.finish()
        draining = bool(_http._DRAINING)
        await asyncio.gather(*_http._DRAINING)
        return draining, await post(upstream)

    (draining, again), served = run(test, handler)
    assert draining and again == b"again"
    assert served.connections == 1
