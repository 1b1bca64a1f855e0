"""The ASGI middleware in front of every route: bearer keys, body size and body timeout, last-resort 500s.

It answers 401 (bad key on /v1/*), 413 (body over the limit, by Content-Length or as it streams in),
408 (a body that stalls) and 500 (an unhandled error, logged once with a request id) itself, in
OpenAI's error envelope, before any route parses the request. Routes and their errors: api.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from . import protocol as p

log = logging.getLogger(__name__)


class GuardMiddleware:
    """Check the bearer key on /v1/* and the body size before any route parses the request."""

    def __init__(self, app, *, api_keys: list[str], max_body_bytes: int, body_timeout_s: float = 30.0):
        self.app, self.max_body_bytes, self.body_timeout_s = app, max_body_bytes, body_timeout_s
        self.api_keys = [k.encode("utf-8") for k in api_keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_keys and scope["path"].startswith("/v1/"):
            if not self._authorized(headers.get(b"authorization", b"")):
                return await _send_error(send, 401,
                                         "Invalid or missing API key: send 'Authorization: Bearer KEY'",
                                         "authentication_error", "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_error(send, 413,
                                     f"the request body has {int(length)} bytes, over the limit of "
                                     f"{self.max_body_bytes}", "invalid_request_error", "request_too_large")
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                receive = await self._read_bounded(receive)  # chunked: no length to check up front
            except BodyTimeoutError:
                return await _send_error(send, 408, f"the request body did not arrive within "
                                         f"{self.body_timeout_s:g}s", "invalid_request_error",
                                         "request_timeout")
            if receive is None:
                return await _send_error(send, 413,
                                         f"the request body is over the limit of {self.max_body_bytes} "
                                         "bytes", "invalid_request_error", "request_too_large")
        return await self._call_guarded(scope, TimedReceive(receive, self.body_timeout_s), send)

    def _authorized(self, header: bytes) -> bool:
        """Compare the bearer token as bytes, in constant time, against every key (any bytes: no 500)."""
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        ok = False
        for key in self.api_keys:
            ok |= hmac.compare_digest(token, key)
        return scheme.lower() == b"bearer" and ok

    async def _call_guarded(self, scope, receive: TimedReceive, send):
        """Run the app; an unhandled error is logged once with a request id and answered 500 with it.

        A body that timed out is answered 408, whatever the route made of the failed read.
        """
        started = False

        async def tracked_send(message):
            nonlocal started
            if receive.timed_out:
                if not started:
                    started = True
                    await _send_error(send, 408, "the request body did not arrive within "
                                      f"{self.body_timeout_s:g}s", "invalid_request_error", "request_timeout")
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except BodyTimeoutError:
            await tracked_send({"type": "http.response.start"})
        except Exception:
            request_id = p.new_id("req")
            log.exception("internal error in %s %s (request id %s)", scope.get("method"), scope.get("path"),
                          request_id)
            if not started:
                await _send_error(send, 500, f"internal error (request id {request_id})", "server_error",
                                  "internal_error")

    async def _read_bounded(self, receive):
        """Read the whole body (at most max_body_bytes); return a receive that replays it, or None."""
        chunks, size = [], 0
        receive = TimedReceive(receive, self.body_timeout_s)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks = None
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks or []), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()
        return replayed


class BodyTimeoutError(Exception):
    """The client sent the request body too slowly (HTTP 408)."""


class TimedReceive:
    """An ASGI receive where waiting over `seconds` for the next body chunk raises BodyTimeoutError.

    Only while the body is still arriving: once it has ended, receive waits for a disconnect, which
    may take as long as a streamed reply. `timed_out` stays set once it fired.
    """

    def __init__(self, receive, seconds: float):
        self.receive, self.seconds = receive, seconds
        self.timed_out = self.done = False

    async def __call__(self):
        if self.done:
            return await self.receive()
        try:
            message = await asyncio.wait_for(self.receive(), self.seconds)
        except asyncio.TimeoutError:
            self.timed_out = True
            raise BodyTimeoutError from None
        self.done = message["type"] != "http.request" or not message.get("more_body", False)
        return message


async def _send_error(send, status: int, message: str, type: str, code: str) -> None:
    body = json.dumps(p.error_body(message, type, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

