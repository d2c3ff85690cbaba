"""The outermost layer of the server (plain ASGI, around FastAPI): the API key check, and one structured log line per
request (its id, status, tokens in and out, time to first token, tokens/s), never a traceback."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

from ..errors import log
from .schemas import ApiError

OPEN_PATHS = ("/", "/health")  # no key needed: the page is static (it asks for the key), /health is for probes


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


def log_line(fields: dict) -> None:
    log("request " + " ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None))


class RequestLog:
    def __init__(self, app, state):
        self.app, self.state = app, state

    async def _send_json(self, send, error: ApiError) -> None:
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope) -> bool:
        key = self.state.api_key
        if not key or scope["path"] in OPEN_PATHS:
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        info: dict = {}
        scope.setdefault("state", {})["medlora"] = info
        status = {"code": None}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if not self._authorized(scope):
                info["error"] = "invalid_api_key"
                await self._send_json(send_logged, ApiError(401, "missing or wrong API key: send the header "
                                                                 "'Authorization: Bearer KEY'", code="invalid_api_key",
                                                            headers={"WWW-Authenticate": "Bearer"}))
            else:
                await self.app(scope, receive, send_logged)
        except Exception as e:  # noqa: BLE001 - a bug must not reach the client or the log as a traceback
            info["error"] = "internal: " + " ".join(f"{type(e).__name__}: {e}".split())[:300]
            if status["code"] is None:
                await self._send_json(send_logged, ApiError(500, "internal server error", code="internal_error"))
        finally:
            await self._log(scope, info, status["code"], t0)

    async def _log(self, scope, info: dict, status: int | None, t0: float) -> None:
        path = scope["path"]
        if path == "/health":
            return  # probes (and the page, while the model loads) would fill the log
        job = info.get("job")
        if job is not None:  # wait (briefly) for the worker's numbers: a hung-up stream is stopping meanwhile
            try:
                await asyncio.wait_for(asyncio.shield(job.done), timeout=30)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
        fields = {"id": info.get("id"), "method": scope.get("method"), "path": path, "status": status,
                  "client": (scope.get("client") or ("?",))[0], "stream": info.get("stream"),
                  "tokens_in": info.get("tokens_in")}
        if job is not None:
            end = job.finished or time.monotonic()
            gen = (end - job.started) if job.started else None
            fields.update(tokens_out=job.completion_tokens, queue_s=(job.started or end) - job.received,
                          ttft_s=(job.first_text - job.received) if job.first_text else None,
                          tok_s=job.completion_tokens / gen if gen else None,
                          finish=job.finish_reason, error=("generation: " + job.error) if job.error else None)
        fields.update(total_s=time.monotonic() - t0, error=fields.get("error") or info.get("error"))
        log_line(fields)
