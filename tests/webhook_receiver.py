"""A webhook receiver on loopback for tests: an http.server in a thread that records every POST it gets."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    """One POST: its headers (lower-case names) and raw body."""

    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """The receiver's URL, what it got, and how many of the first requests it answers with 500."""

    url: str
    fail_first: int = 0
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, predicate: Any, timeout: float = 60.0) -> Received:
        """The first request for which ``predicate(request)`` is true, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = next((request for request in self.requests if predicate(request)), None)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching webhook request in {timeout} s; got {len(self.requests)}")
            time.sleep(0.1)


@contextmanager
def webhook_receiver(fail_first: int = 0) -> Iterator[Receiver]:
    """Run a receiver on 127.0.0.1 until the block ends; the first ``fail_first`` POSTs get a 500."""
    receiver = Receiver(url="", fail_first=fail_first)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with receiver.lock:
                receiver.requests.append(Received({k.lower(): v for k, v in self.headers.items()}, body))
                failing = len(receiver.requests) <= receiver.fail_first
            self.send_response(500 if failing else 200)
            self.end_headers()
            self.wfile.write(b"boom" if failing else b"ok")

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
