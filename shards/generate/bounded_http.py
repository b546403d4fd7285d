"""One HTTP request bounded in time and in size, for the endpoint client (`shards.generate.client`).

`requests`' timeout, and urllib3's under it, limits each socket operation, not the request: an endpoint that answers
and then sends one byte a second keeps every read alive, and holds the caller for as long as it likes. Here one
deadline covers connecting, sending, the status line and headers, and the whole body: a watchdog thread shuts the
socket down when it passes, which wakes a blocked read at once wherever the request is (TLS handshake included).
The body is read up to a byte limit and no further, so an answer of any size costs at most that much memory.

Proxies from the environment (`https_proxy`, `http_proxy`, `no_proxy`) and `REQUESTS_CA_BUNDLE` are honoured, as
`requests` honoured them. Name resolution is left to the system resolver's own timeout.
"""

from __future__ import annotations

import base64
import http.client
import os
import socket
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass
from email.message import Message
from urllib.parse import unquote, urlsplit

DEFAULT_MAX_RESPONSE_BYTES = 2 * 1024 * 1024
"""2 MiB. A chat completion of the default 1024 tokens is 5-10 KB of JSON; even 32k tokens of text that JSON escapes
at 6 bytes a character fit within it. Large enough for any honest answer, small enough that a hostile one costs each
worker 2 MiB of memory, not 50 MB."""
_CHUNK = 65536
_SHUTDOWN_AGAIN_S = 0.05


class DeadlineExceeded(TimeoutError):
    """The request did not complete (connect, send, headers, whole body) within its total deadline."""


class ResponseTooLarge(ValueError):
    """The body is longer than the limit; none of it is returned."""

    def __init__(self, limit: int, status: int) -> None:
        super().__init__(f"the answer is longer than {limit} bytes")
        self.limit = limit
        self.status = status
        """The answer's HTTP status (a refusal with a long page is still a refusal)."""


@dataclass
class Reply:
    status: int
    headers: Message
    """The response headers (case-insensitive `get`)."""
    body: bytes


def request(
    method: str, url: str, body: bytes | None, headers: dict[str, str], timeout_s: float, max_bytes: int
) -> Reply:
    """Send one request on a fresh connection and read the whole answer, within `timeout_s` in all.

    Args:
        timeout_s: the total deadline, in seconds, from now until the last byte of the body.
        max_bytes: the longest body accepted.

    Raises:
        DeadlineExceeded: the deadline passed first.
        ResponseTooLarge: the body (as declared, or as read) is longer than `max_bytes`.
        OSError: the connection was refused, reset or dropped (other than by the deadline).
        http.client.HTTPException: not an HTTP answer, a body cut short, or an unusable URL.
    """
    deadline = time.monotonic() + timeout_s
    connection, target, extra_headers = _connection(url, timeout_s)
    finished, fired = threading.Event(), threading.Event()
    handed_over: list[socket.socket] = []
    watchdog = threading.Thread(
        target=_watch, args=(connection, handed_over, deadline, finished, fired), name="request deadline", daemon=True
    )
    watchdog.start()
    response = None
    try:
        sent_headers = {**_basic_auth_of(url), **headers, **extra_headers}  # the caller's Authorization wins
        connection.request(method, target, body=body, headers=sent_headers)
        handed_over.append(connection.sock)  # a closing answer takes the socket over from the connection
        response = connection.getresponse()
        data = _read_body(response, max_bytes)
        if fired.is_set():  # the watchdog ended the body early: what was read is not the whole answer
            raise DeadlineExceeded(f"no complete answer within {timeout_s:g} s")
        return Reply(response.status, response.headers, data)
    except (OSError, http.client.HTTPException) as error:
        if fired.is_set() and not isinstance(error, DeadlineExceeded):
            raise DeadlineExceeded(f"no complete answer within {timeout_s:g} s") from None
        raise
    finally:
        finished.set()
        watchdog.join()
        if response is not None:
            response.close()
        connection.close()


def _read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """The body, read one system call at a time (`read1`), so that no read waits to fill a large buffer."""
    if response.length is not None and response.length > max_bytes:
        raise ResponseTooLarge(max_bytes, response.status)  # declared too long: not a byte of it is read
    received = bytearray()
    while True:
        chunk = response.read1(min(_CHUNK, max_bytes + 1 - len(received)))
        if not chunk:
            break
        received += chunk
        if len(received) > max_bytes:
            raise ResponseTooLarge(max_bytes, response.status)
    if response.length:  # the connection closed before the declared length arrived
        raise http.client.IncompleteRead(bytes(received), response.length)
    return bytes(received)


def _watch(
    connection: http.client.HTTPConnection,
    handed_over: list[socket.socket],
    deadline: float,
    finished: threading.Event,
    fired: threading.Event,
) -> None:
    """At the deadline, shut the request's socket down (a blocked read then returns at once); again every 50 ms
    until the request gives up, since a TLS handshake may put a new socket in place in between.

    `handed_over` holds the socket once the request is sent: `getresponse` drops the connection's reference to it
    when the answer will close the connection, and the response reads from it alone.
    """
    while not finished.wait(max(0.0, deadline - time.monotonic())):
        fired.set()
        for sock in (connection.sock, *handed_over):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed or not yet connected
        deadline = time.monotonic() + _SHUTDOWN_AGAIN_S


def _connection(url: str, timeout_s: float) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
    """(an unopened connection, the request target, headers the proxy needs) for `url`, through the environment's
    proxy when it names one for this host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise http.client.InvalidURL(f"not an http(s) URL: {parts.scheme}://{parts.hostname or ''}")
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    proxy = None if urllib.request.proxy_bypass(parts.hostname) else urllib.request.getproxies().get(parts.scheme)
    if proxy is None:
        if secure:
            return http.client.HTTPSConnection(parts.hostname, port, timeout=timeout_s, context=_tls()), target, {}
        return http.client.HTTPConnection(parts.hostname, port, timeout=timeout_s), target, {}
    via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    credentials = {"Proxy-" + name: value for name, value in _basic_auth_of(via.geturl()).items()}
    if secure:  # a CONNECT tunnel through the proxy, TLS end to end
        connection = http.client.HTTPSConnection(via.hostname, via.port or 8080, timeout=timeout_s, context=_tls())
        connection.set_tunnel(parts.hostname, port, headers=credentials)
        return connection, target, {}
    connection = http.client.HTTPConnection(via.hostname, via.port or 8080, timeout=timeout_s)
    return connection, f"http://{parts.netloc.rsplit('@', 1)[-1]}{target}", credentials  # absolute form, no userinfo


def _basic_auth_of(url: str) -> dict[str, str]:
    """`Authorization: Basic ...` from a `user:password@` in the URL, as `requests` sent it; {} without one."""
    parts = urlsplit(url)
    if parts.username is None:
        return {}
    token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _tls() -> ssl.SSLContext:
    """Certificate checks against the CA bundle `requests` would use: `$REQUESTS_CA_BUNDLE`, else certifi's."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle is None:
        try:
            import certifi

            bundle = certifi.where()
        except ImportError:  # the system's own store
            bundle = None
    return ssl.create_default_context(cafile=bundle)
