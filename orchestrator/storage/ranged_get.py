"""Ranged GETs of one S3 object, streamed a piece at a time through a small reused buffer.

botocore's get_object builds a new bytes object for every response; for 16 MiB ranges
that is a fresh allocation (and 4096 page faults) each time, which on a 2-core machine
cost a pull more kernel time than the transfer. Here each range is a presigned SigV4 GET
(signed by botocore, so credentials, session tokens and addressing are botocore's) sent
over a plain http.client keep-alive connection per thread, and read with readinto, 1 MiB
at a time, into the thread's own buffer. Anything unexpected (a redirect, an error status,
a proxy in the environment, TLS trouble) falls back to botocore for good: nothing is lost
but speed.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
from typing import Callable
from urllib.parse import urlsplit

from .transfer import Sink, piece_buffer

PRESIGN_S = 900  # each range signs its own URL: a pull longer than this never holds a stale one
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


class _Unexpected(Exception):
    """The direct path saw something botocore knows better how to handle."""


class RangedGet:
    def __init__(self, presign: Callable[[], str], key: str, fallback: Callable[[int, int], bytes], timeout: float = 120.0):
        """presign() -> a GET URL of the object signed in its query (SigV4; botocore's or s3light's);
        fallback(start, length) -> bytes: the same range through botocore."""
        self.presign, self.key, self.timeout = presign, key, timeout
        self.fallback = fallback
        self.direct = not any(os.environ.get(v) for v in _PROXY_VARS)
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def fetch(self, start: int, length: int, put: Sink) -> None:
        """put(offset, piece) for every byte of [start, start + length), in order."""
        if self.direct:
            try:
                self._direct(start, length, put)
                return
            except (_Unexpected, OSError, http.client.HTTPException, ssl.SSLError, ValueError):
                self.direct = False  # botocore from now on (it retries, follows redirects, explains errors)
                self._drop_connection()
        data = self.fallback(start, length)
        if len(data) != length:
            raise _short(self.key, start, len(data), length)
        put(start, memoryview(data))

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    # -- the direct path -------------------------------------------------------------------

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "netloc", None) != (scheme, netloc):
            if scheme == "https":
                ca = os.environ.get("AWS_CA_BUNDLE")
                ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
                conn = http.client.HTTPSConnection(netloc, timeout=self.timeout, context=ctx)
            else:
                conn = http.client.HTTPConnection(netloc, timeout=self.timeout)
            self._local.conn, self._local.netloc = conn, (scheme, netloc)
            with self._lock:
                self._conns.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _direct(self, start: int, length: int, put: Sink) -> None:
        end = start + length - 1
        url = urlsplit(self.presign())
        target = url.path + (f"?{url.query}" if url.query else "")
        for attempt in (1, 2):  # a keep-alive connection the server closed meanwhile: once more on a new one
            conn = self._connection(url.scheme, url.netloc)
            try:
                conn.request("GET", target, headers={"Range": f"bytes={start}-{end}"})
                resp = conn.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._drop_connection()
                if attempt == 2:
                    raise
        if resp.status not in (200, 206):
            resp.read()
            raise _Unexpected(f"HTTP {resp.status}")
        header = resp.getheader("Content-Length")
        # A 206 must be the range asked for; some servers (rclone) answer a range with 200 and
        # just its bytes: the length tells those apart from a whole object sent instead.
        if header is None or int(header) != length:
            self._drop_connection()
            raise _Unexpected(f"{header} bytes for a range of {length}")
        if resp.status == 206 and not (resp.getheader("Content-Range") or "").startswith(f"bytes {start}-{end}/"):
            self._drop_connection()
            raise _Unexpected(f"Content-Range {resp.getheader('Content-Range')!r} for bytes {start}-{end}")
        buf = piece_buffer()
        got = 0
        while got < length:
            n = resp.readinto(buf[: min(len(buf), length - got)])
            if not n:
                raise _Unexpected(f"the connection closed after {got} of {length} bytes")
            put(start + got, buf[:n])
            got += n


def _short(key: str, start: int, got: int, expected: int) -> Exception:
    from ..errors import StorageError

    return StorageError(f"short read of {key} at byte {start}: {got} of {expected} bytes; run again to resume")
