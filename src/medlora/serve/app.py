"""The FastAPI application: OpenAI's ``/v1/models`` and ``/v1/chat/completions`` (JSON or server-sent events),
``/health``, and the chat page at ``/``. Every error is answered in OpenAI's shape, never as a traceback."""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MedloraError
from ..inference.backend import DEFAULT_CONTEXT, context_length
from .middleware import RequestLog
from .schemas import ApiError, ChatRequest, Defaults, generation_params, parse_request
from .worker import Job, Worker

@dataclass
class ServerState:
    model_id: str
    defaults: Defaults = field(default_factory=Defaults)
    api_key: str | None = None
    max_queue: int = 8
    max_request_bytes: int = 1_000_000
    system_prompt: str | None = None  # --system_prompt; else the backend's (the run's training prompt)
    created: int = field(default_factory=lambda: int(time.time()))
    backend: object = None
    worker: Worker | None = None
    context: int = DEFAULT_CONTEXT
    load_error: str | None = None
    description: str = ""
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    def set_backend(self, backend) -> None:
        self.context = context_length(backend)
        self.description = backend.description
        self.system_prompt = self.system_prompt or backend.system_prompt
        self.worker = Worker(backend, self.max_queue)
        self.backend = backend  # last: from here on /health says ready

    def status(self) -> str:
        return "failed" if self.load_error else ("ok" if self.backend is not None else "loading")

    def count_tokens(self, messages: list[dict]) -> int:
        with self.tokenizer_lock:  # one tokenizer, many request threads
            return self.backend.count_tokens(messages)


def page_html() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


async def read_body(request: Request, cap: int) -> bytes:
    too_big = ApiError(413, f"the request body is larger than this server's limit of {cap} bytes "
                            "(--max_request_bytes)", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise too_big
    return bytes(body)


def usage(job: Job) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


def finish_reason(job: Job) -> str:
    return "length" if job.finish_reason == "length" else "stop"


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(job: Job, model_id: str, created: int, include_usage: bool):
    """OpenAI's chunk sequence: the role, content deltas, the finish_reason, the usage (when asked), [DONE]."""
    base = {"id": job.id, "object": "chat.completion.chunk", "created": created, "model": model_id,
            "system_fingerprint": None}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish: str | None = None) -> str:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (event := await job.events.get())[0] == "text":
            yield chunk({"content": event[1]})
        if job.error:
            yield sse(ApiError(500, f"generation failed: {job.error}", code="generation_failed").body())
        else:
            yield chunk({}, finish_reason(job))
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage(job)})
        yield sse("[DONE]")
    finally:
        if job.finished is None:  # the client hung up (or the server is stopping): stop generating now
            job.cancel()


async def collect(request: Request, job: Job, model_id: str, created: int) -> JSONResponse:
    parts: list[str] = []
    checked = time.monotonic()
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
            kind = None
        if time.monotonic() - checked >= 0.5:  # twice a second: has the client hung up?
            checked = time.monotonic()
            if await request.is_disconnected():
                job.cancel()
                return JSONResponse(ApiError(400, "client closed the request").body(), status_code=499)
        if kind == "text":
            parts.append(value)
        elif kind is not None:
            break
    if job.error:
        raise ApiError(500, f"generation failed: {job.error}", code="generation_failed")
    return JSONResponse({
        "id": job.id, "object": "chat.completion", "created": created, "model": model_id, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts), "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason(job)}],
        "usage": usage(job)})


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="medlora", docs_url=None, redoc_url=None, openapi_url=None)
    page = page_html()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        request.state.medlora["error"] = e.code or ApiError.TYPES.get(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no such route: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return await api_error(request, ApiError(e.status_code, message, headers=getattr(e, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):  # OpenAI answers 400, not 422
        err = (e.errors() or [{}])[0]
        param = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query")) or None
        return await api_error(request, ApiError(400, f"{param}: {err.get('msg', 'invalid request')}", param))

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):  # answered in OpenAI's shape; RequestLog logs it on one line
        return JSONResponse(ApiError(500, "internal server error", code="internal_error").body(), status_code=500)

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "img-src 'self' data:", "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        body = {"status": state.status(), "model": state.model_id, "description": state.description,
                "max_tokens_limit": state.defaults.max_tokens_limit,
                "queue": state.worker.snapshot() if state.worker else {"waiting": 0, "running": 0,
                                                                         "max_queue": state.max_queue}}
        if state.load_error:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=200 if state.status() == "ok" else 503)

    def model_card() -> dict:
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "medlora"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.model_id:
            raise ApiError(404, f"The model '{model_id}' does not exist; this server serves '{state.model_id}'",
                           "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        info = request.state.medlora
        req: ChatRequest = parse_request(await read_body(request, state.max_request_bytes))
        if req.model not in (None, state.model_id):
            raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{state.model_id}'",
                           "model", "model_not_found")
        if state.backend is None:
            raise ApiError(503, "the model is still loading; retry shortly" if not state.load_error
                           else f"the model failed to load: {state.load_error}", code="model_loading",
                           headers={"Retry-After": "5"})
        params, asked = generation_params(req, state.defaults)
        stops = req.stop_strings()
        if state.worker.full():  # before tokenizing: a busy server answers 429 cheaply
            raise queue_full(state)
        messages = [m.as_dict() for m in req.messages]
        if not any(m["role"] == "system" for m in messages):  # the run's safety prompt, unless the client sent one
            messages.insert(0, {"role": "system", "content": state.system_prompt})
        try:
            n_prompt = await run_in_threadpool(state.count_tokens, messages)
        except (TemplateError, MedloraError) as e:  # e.g. a chat template that insists on alternating roles
            raise ApiError(400, f"the model's chat template cannot format these messages: {e}", "messages") from None
        info["stream"] = bool(req.stream)
        info["tokens_in"] = n_prompt
        room = state.context - n_prompt
        if room < 1 or (asked and params.max_new_tokens > room):
            raise ApiError(400, f"This model's maximum context length is {state.context} tokens; the messages take "
                                f"{n_prompt}" + (f" and max_tokens asks for {params.max_new_tokens} more" if asked
                                                 else ""), "messages", "context_length_exceeded")
        params = replace(params, max_new_tokens=min(params.max_new_tokens, room))
        job = Job(f"chatcmpl-{secrets.token_hex(12)}", messages, params, stops, asyncio.get_running_loop())
        info["id"] = job.id
        if not state.worker.submit(job):
            raise queue_full(state)
        info["job"] = job
        created = int(time.time())
        if req.stream:
            return StreamingResponse(stream_events(job, state.model_id, created, req.include_usage()),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              "X-Request-Id": job.id})
        response = await collect(request, job, state.model_id, created)
        response.headers["X-Request-Id"] = job.id
        return response

    return RequestLog(app, state)


def queue_full(state: ServerState) -> ApiError:
    # Retry-After: about one default-length answer's time at 20 tokens/s, 1 to 60 seconds
    seconds = max(1, min(60, math.ceil(state.defaults.max_new_tokens / 20)))
    return ApiError(429, f"the server is busy ({state.max_queue} requests already waiting); retry later",
                    code="queue_full", headers={"Retry-After": str(seconds)})
