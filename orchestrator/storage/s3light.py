"""The reads a pull makes (list, get, presign), signed by botocore's SigV4 signer, sent by http.client.

Building botocore's S3 client (its service model, endpoint rules, event hooks) cost 0.3 s of
CPU of every pull here, a sixth of pulling 1 GiB; its signer alone costs next to nothing. For
the common case, an S3-compatible endpoint (R2, B2, MinIO, rclone, OSS) with keys in the
environment or handed to the instance, a pull needs three kinds of request, which this module
sends itself, signed by botocore.auth (the signing stays the library's). Anything else (a
profile, SSO, an instance role, AWS's own endpoints, a proxy) is botocore's client's, and so
is any answer but a 2xx or a 404: the caller then asks the client, whose retries and error
messages stand.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
from typing import Any
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class Fallback(Exception):
    """Not for this module: ask botocore."""


def _uri(text: str) -> str:
    return quote(text, safe="-_.~")


class LightS3:
    def __init__(self, endpoint: str, region: str, access_key: str, secret_key: str, token: str = "", timeout: float = 60.0):
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"not an endpoint URL: {endpoint!r}")
        self.scheme, self.netloc, self.base = url.scheme, url.netloc, url.path.rstrip("/")
        self.region = region
        from botocore.credentials import Credentials

        self._credentials = Credentials(access_key, secret_key, token or None)
        self.timeout = timeout
        self._local = threading.local()

    @classmethod
    def configured(cls, credentials: dict[str, str] | None = None) -> LightS3 | None:
        """One for these credentials (or the environment's keys), or None: then botocore does it all."""
        if any(os.environ.get(v) for v in _PROXY_VARS):
            return None
        creds = credentials or {}
        if credentials:
            access, secret, token = creds.get("access_key"), creds.get("secret_key"), creds.get("token") or ""
        elif os.environ.get("AWS_PROFILE"):
            return None
        else:
            access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
            token = os.environ.get("AWS_SESSION_TOKEN") or ""
        endpoint = creds.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not (access and secret and endpoint):
            return None
        region = creds.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        try:
            return cls(endpoint, region, access, secret, token)
        except ValueError:
            return None

    # -- signing (AWS Signature Version 4, by botocore's own signer) --------------------------

    def _path(self, bucket: str, key: str) -> str:
        return f"{self.base}/{_uri(bucket)}" + (f"/{quote(key, safe='-_.~/')}" if key else "")

    def _url(self, bucket: str, key: str, query: dict[str, str] | None) -> str:
        qs = "&".join(f"{_uri(k)}={_uri(v)}" for k, v in sorted((query or {}).items()))
        return f"{self.scheme}://{self.netloc}{self._path(bucket, key)}" + (f"?{qs}" if qs else "")

    def signed(self, method: str, bucket: str, key: str = "", query: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
        """(path?query, headers) of a request signed in its headers."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method=method, url=self._url(bucket, key, query))
        S3SigV4Auth(self._credentials, "s3", self.region).add_auth(request)
        target = urlsplit(request.url)
        return target.path + (f"?{target.query}" if target.query else ""), dict(request.headers.items())

    def presign(self, bucket: str, key: str, expires: int = 900) -> str:
        """A GET URL signed in its query, good for `expires` seconds (any Range header may be added)."""
        from botocore.auth import S3SigV4QueryAuth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method="GET", url=self._url(bucket, key, None))
        S3SigV4QueryAuth(self._credentials, "s3", self.region, expires=expires).add_auth(request)
        return request.url

    # -- requests ----------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.scheme == "https":
                ca = os.environ.get("AWS_CA_BUNDLE")
                ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
                conn = http.client.HTTPSConnection(self.netloc, timeout=self.timeout, context=ctx)
            else:
                conn = http.client.HTTPConnection(self.netloc, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _get(self, bucket: str, key: str = "", query: dict[str, str] | None = None) -> tuple[int, bytes]:
        target, headers = self.signed("GET", bucket, key, query)
        for attempt in (1, 2):  # a keep-alive connection the server closed meanwhile: once more
            conn = self._connection()
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (http.client.HTTPException, OSError) as e:
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise Fallback(f"{type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")

    def get(self, bucket: str, key: str) -> bytes | None:
        """The object's bytes; None when there is no such key."""
        status, body = self._get(bucket, key)
        if status == 200:
            return body
        if status == 404 and b"NoSuchKey" in body:
            return None
        raise Fallback(f"HTTP {status}")

    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        keys: list[str] = []
        token = None
        while True:
            query = {"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})}
            status, body = self._get(bucket, "", query)
            if status != 200:
                raise Fallback(f"HTTP {status}")
            try:
                root = ElementTree.fromstring(body)
            except ElementTree.ParseError as e:
                raise Fallback(f"unreadable listing: {e}") from None
            keys += [el.text or "" for el in root.iter(f"{_NS}Key")]
            if (root.findtext(f"{_NS}IsTruncated") or "").lower() != "true":
                return keys
            token = root.findtext(f"{_NS}NextContinuationToken")
            if not token:
                raise Fallback("a truncated listing without a continuation token")

    def close(self) -> None:
        conn: Any = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
