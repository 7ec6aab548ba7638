"""Request bodies: ``BodySizeLimit``, an ASGI middleware that counts a request body's bytes as they arrive and
answers 413 at its limit (uploads, JSON, sign-in forms each have their own), before the app reads or spools
more. The archive and base-model checks both processes need are ``app/core/safety.py``.
"""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.settings import get_settings

# Room for the multipart envelope and form fields around an upload of the largest allowed size.
BODY_OVERHEAD_BYTES = 1024 * 1024
# Bodies sent without signing in (the sign-in and registration forms) are a few hundred bytes.
PUBLIC_BODY_MAX_BYTES = 64 * 1024


class BodySizeLimit:
    """Stop a request body at its limit while it arrives: 413 before the app sees more than the limit.

    The limit depends on what the body is: a multipart upload may be PEFT_STUDIO_MAX_UPLOAD_BYTES (plus the
    envelope around the file); JSON, urlencoded forms and anything else PEFT_STUDIO_MAX_JSON_BYTES; anything
    sent to a public path (the sign-in forms) PUBLIC_BODY_MAX_BYTES. A declared ``Content-Length`` beyond the
    limit is refused before reading; a chunked body (no length) is counted in ``receive``, and when it passes the
    limit the 413 goes out at once and the app is told the client went away, so nothing more is read or spooled.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = body_limit(scope)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _too_large(scope, send, limit, setting, int(value))
                return
        received = 0
        refused = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await _too_large(scope, send, limit, setting)
                    return {"type": "http.disconnect"}  # the app stops reading (ClientDisconnect)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 has been sent; the app's own answer to the cut-off body is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)


def body_limit(scope: Scope) -> tuple[int, str]:
    """The most bytes a request's body may have, and the setting that says so."""
    from app.http.auth import is_public  # lazily: the worker imports this module and never loads FastAPI

    settings = get_settings()
    if is_public(scope["path"]):
        return PUBLIC_BODY_MAX_BYTES, "the sign-in forms' fixed limit"
    content_type = b""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            content_type = value.lower()
    if content_type.startswith(b"multipart/form-data"):
        return settings.max_upload_bytes + BODY_OVERHEAD_BYTES, "PEFT_STUDIO_MAX_UPLOAD_BYTES"
    return settings.max_json_bytes, "PEFT_STUDIO_MAX_JSON_BYTES"


async def _too_large(scope: Scope, send: Send, limit: int, setting: str, declared: int | None = None) -> None:
    from app.http.errors import error_json

    size = f"is {declared:,} bytes" if declared is not None else "passed"
    message = f"The request body {size}; the limit for this request is {limit:,} bytes ({setting})."
    response = error_json(scope["path"], 413, message, headers={"connection": "close"})
    await response(scope, _nothing_more, send)


async def _nothing_more() -> Message:
    return {"type": "http.disconnect"}
