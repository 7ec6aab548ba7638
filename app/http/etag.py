"""Conditional JSON responses: an ``ETag`` on every answer, ``304 Not Modified`` when the client has it already.

A job page polls the job, its metrics and its series every few seconds; most answers are the same as last time.
Two ways to a tag, cheapest first:

- ``version``: a short string that changes whenever the body would (the newest point id and the point count,
  say), known from one small query. A match answers 304 without loading or encoding anything, and the encoded
  body of a version is kept in a small in-process cache, so a hundred viewers of one job encode it once.
- otherwise the tag is a hash of the encoded body: the client still gets a 304 (no body on the wire, nothing to
  parse), the server still builds the body.

``Cache-Control: no-cache`` lets browsers keep the body and ask again with ``If-None-Match`` every time.
"""

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import Response

CACHED_BODIES = 256


def _tag(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'


def _matches(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match")
    if not header:
        return False
    if header.strip() == "*":
        return True
    return any(candidate.strip().removeprefix("W/") == etag for candidate in header.split(","))


def _response(request: Request, etag: str, body: Callable[[], bytes]) -> Response:
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if _matches(request, etag):
        return Response(status_code=304, headers=headers)
    return Response(body(), media_type="application/json", headers=headers)


class BodyCache:
    """Encoded bodies by version key (least recently used goes first); thread-safe."""

    def __init__(self, capacity: int = CACHED_BODIES) -> None:
        self.capacity = capacity
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key: str, make: Callable[[], bytes]) -> bytes:
        """The body stored under ``key``, made (outside the lock) and stored when missing."""
        with self._lock:
            body = self._bodies.get(key)
            if body is not None:
                self._bodies.move_to_end(key)
                return body
        body = make()
        with self._lock:
            self._bodies[key] = body
            while len(self._bodies) > self.capacity:
                self._bodies.popitem(last=False)
        return body

    def clear(self) -> None:
        """Forget every body."""
        with self._lock:
            self._bodies.clear()


bodies = BodyCache()


def versioned_json(request: Request, version: str, make: Callable[[], bytes]) -> Response:
    """A JSON answer whose body is a function of ``version`` (which must name the resource, its owner scope and
    every parameter): 304 on a match, else the body, encoded at most once per version in this process."""
    etag = _tag(version)
    return _response(request, etag, lambda: bodies.get_or_make(version, make))


def hashed_json(request: Request, body: bytes) -> Response:
    """A JSON answer tagged by the hash of its body: 304 when the client holds the same bytes."""
    return _response(request, _tag(body), lambda: body)
