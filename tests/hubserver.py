"""A local stand-in for the Hugging Face Hub's file endpoint, for tests.

It answers ``HEAD`` and ``GET /{owner}/{name}/resolve/{revision}/{filename}`` with what
``huggingface_hub`` reads there (``file_download.get_hf_file_metadata`` and ``http_get``):
``X-Repo-Commit`` naming the commit a branch resolves to, ``ETag`` and ``X-Linked-Etag``
carrying the file's sha256 and ``X-Linked-Size`` its size (as the Hub sends them for LFS
files), ``Content-Length``, ``X-Error-Code`` on a 404, and ``Range`` requests for a resumed
download. Knobs make it misbehave the ways a network does: holding a body back, stalling
mid-body, or dropping the connection.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import unquote

CHUNK = 64 * 1024


class FakeHub:
    """Serves published files on 127.0.0.1 from a thread; use it as a context manager."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str, str], bytes] = {}
        """(repo, commit, filename) -> content."""
        self.branches: dict[tuple[str, str], str] = {}
        """(repo, branch) -> commit."""
        self.requests: list[tuple[str, str, str | None]] = []
        """(method, path, Range header) of every request, in order."""
        self.hold_bodies = threading.Event()
        """While cleared, GET bodies wait until it is set (set by default)."""
        self.hold_bodies.set()
        self.stall_after: int | None = None
        """Send this many body bytes, then send nothing more until the hub closes."""
        self.stalled = threading.Event()
        """Set once a response has stalled."""
        self.drop_after: int | None = None
        """Send this many body bytes of a full (non-Range) GET, then close the connection."""
        self.refuse_after_drop = False
        """Answer every GET after a dropped one with 503, which the client does not retry."""
        self._dropped = False
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def publish(self, repo: str, filename: str, content: bytes, *, branch: str = "main") -> str:
        """Commit ``content`` as ``filename`` on ``branch``; return the new commit's hash."""
        parent = self.branches.get((repo, branch), "")
        commit = hashlib.sha1(f"{parent}{repo}{filename}".encode() + content).hexdigest()
        for (r, c, f), data in list(self.files.items()):
            if r == repo and c == parent and f != filename:
                self.files[(repo, commit, f)] = data
        self.files[(repo, commit, filename)] = content
        self.branches[(repo, branch)] = commit
        return commit

    def gets(self) -> list[str]:
        return [path for method, path, _ in self.requests if method == "GET"]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closing.set()
        self.hold_bodies.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _answer(self, *, body: bool) -> None:
            wanted = self.headers.get("Range")
            hub.requests.append((self.command, self.path, wanted))
            parts = self.path.split("?", 1)[0].lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return self._error(404, "RepoNotFound")
            repo = f"{parts[0]}/{parts[1]}"
            revision, filename = unquote(parts[3]), unquote("/".join(parts[4:]))
            if not any(r == repo for r, _ in hub.branches):
                return self._error(404, "RepoNotFound")
            commit = hub.branches.get((repo, revision), revision)
            if not any(r == repo and c == commit for r, c, _ in hub.files):
                return self._error(404, "RevisionNotFound")
            content = hub.files.get((repo, commit, filename))
            if content is None:
                return self._error(404, "EntryNotFound", commit)
            if body and hub.refuse_after_drop and hub._dropped:
                return self._error(503, "ServiceUnavailable", commit)
            start = 0 if wanted is None else int(wanted.removeprefix("bytes=").split("-")[0])
            sha256 = hashlib.sha256(content).hexdigest()
            self.send_response(206 if wanted else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{sha256}"')
            self.send_header("X-Linked-Etag", f'"{sha256}"')
            self.send_header("X-Linked-Size", str(len(content)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(content) - start))
            if wanted:
                self.send_header(
                    "Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}"
                )
            self.end_headers()
            if body:
                self._send(content[start:], full=wanted is None)

        def _send(self, data: bytes, *, full: bool) -> None:
            hub.hold_bodies.wait()
            limit = len(data)
            if hub.drop_after is not None and full:
                limit = min(limit, hub.drop_after)
                hub._dropped = limit < len(data)
            if hub.stall_after is not None:
                limit = min(limit, hub.stall_after)
            for offset in range(0, limit, CHUNK):
                self.wfile.write(data[offset : min(offset + CHUNK, limit)])
            self.wfile.flush()
            if hub.stall_after is not None and limit < len(data):
                hub.stalled.set()
                hub._closing.wait()
            # Returning closes the connection (HTTP/1.0): a short body reads as a dropped one.

        def _error(self, status: int, code: str, commit: str | None = None) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
