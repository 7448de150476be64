"""A local HTTP file server for testing downloads for real (apps use it to test their registry entries).

    with FileServer({"a.bin": data}) as server:
        server.drop_after["a.bin"] = [1000]        # the first GET of a.bin breaks after 1000 body bytes
        download_url(server.url("a.bin"), dest)
        server.requests                             # [("/a.bin", None), ("/a.bin", "bytes=1000-")]

It serves bytes from a dict on 127.0.0.1 (an OS-chosen port), answers `Range: bytes=N-` / `bytes=N-M` with
206 (or 416 past the end) unless `ignore_range`, and can cut the connection mid-body to simulate a
network failure.
"""

from __future__ import annotations

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["FileServer"]


class FileServer:
    def __init__(self, files: dict[str, bytes] | None = None, *, ignore_range: bool = False):
        self.files: dict[str, bytes] = dict(files or {})
        self.ignore_range = ignore_range
        #: path -> list of byte counts; each GET of that path pops one and breaks after that many body bytes.
        self.drop_after: dict[str, list[int]] = {}
        #: (path, Range header or None) for every GET, in order.
        self.requests: list[tuple[str, str | None]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, name: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/{name.lstrip('/')}"

    def requests_for(self, name: str) -> list[str | None]:
        """The Range headers of every GET of `name`."""
        return [r for path, r in self.requests if path == "/" + name.lstrip("/")]

    def __enter__(self) -> "FileServer":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _make_handler(owner: FileServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):
            range_header = self.headers.get("Range")
            owner.requests.append((self.path, range_header))
            data = owner.files.get(self.path.lstrip("/"))
            if data is None:
                self.send_error(404, "Not Found")
                return
            start, end = 0, len(data) - 1
            status = 200
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
            if match and not owner.ignore_range:
                start = int(match.group(1))
                end = min(int(match.group(2)), len(data) - 1) if match.group(2) else len(data) - 1
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            body = data[start:end + 1]
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            drops = owner.drop_after.get(self.path.lstrip("/"))
            if drops:
                cut = drops.pop(0)
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

    return Handler
