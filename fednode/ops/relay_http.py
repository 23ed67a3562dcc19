"""The relay endpoint between processes: a hospital on the relay path POSTs the CID of its signed update (the
document itself is in storage) to the aggregator's `[aggregator] relay_listen` address; the aggregator puts it in
its relayer's inbox. Nothing but a well-formed CID is accepted; the relayer checks the signed update itself."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from ..storage.cid import cid_digest

PATH = "/signed-updates"
MAX_BODY = 256


class RelayError(RuntimeError):
    """The aggregator's relay endpoint refused or did not answer."""


def serve_relay(listen: str, receive) -> ThreadingHTTPServer:
    """Serve the relay endpoint on "host:port" in a daemon thread; `receive(cid)` gets every CID handed over.
    Stop it with `.shutdown()`."""
    host, _, port = listen.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            length = int(self.headers.get("Content-Length") or 0)
            cid = self.rfile.read(min(length, MAX_BODY)).decode("ascii", "replace").strip()
            try:
                if self.path != PATH or length > MAX_BODY:
                    raise ValueError(f"POST a CID of at most {MAX_BODY} bytes to {PATH}")
                cid_digest(cid)
            except ValueError as exc:
                self._answer(400, f"{exc}\n")
                return
            receive(cid)
            self._answer(202, "queued\n")

        def _answer(self, code: int, text: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text.encode())

        def log_message(self, *args):  # the aggregator logs what it relays
            pass

    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="relay").start()
    return server


def relay_client(url: str, timeout: float = 30.0):
    """A hand-over function posting CIDs to the aggregator's relay endpoint at `url`."""
    def hand(cid: str) -> None:
        try:
            answer = requests.post(url.rstrip("/") + PATH, data=cid.encode(), timeout=timeout)
        except requests.RequestException as exc:
            raise RelayError(f"relay {url} unreachable: {type(exc).__name__}") from None
        if answer.status_code != 202:
            raise RelayError(f"relay {url} refused the signed update: {answer.text.strip()}")
    return hand
