"""The HTTP side every REST simulator shares: a threaded server on 127.0.0.1 whose every
request is answered by the simulator's `handle(method, url, headers, body)`."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Handle = Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]


def serve(handle: Handle, name: str, methods: tuple[str, ...] = ("GET", "POST", "PUT", "DELETE", "PATCH")
          ) -> tuple[ThreadingHTTPServer, str]:
    """Start serving on a free port; returns the server (shutdown() and server_close() stop it)
    and its base URL, http://127.0.0.1:PORT. Methods not listed get http.server's own 501."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            status, headers, answer = handle(self.command, f"http://{self.headers.get('host')}{self.path}",
                                             dict(self.headers.items()), body)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    for method in methods:
        setattr(Handler, f"do_{method}", Handler._serve)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server, f"http://{host}:{port}"
