"""The request body of ``POST /v1/chat/completions`` (OpenAI's chat-completions shape, the fields medlora acts on),
its errors in OpenAI's shape, and the mapping of its sampling fields onto medlora's decoding presets.

Parsing is pydantic's, in strict mode: JSON is parsed and checked in one step, ``"0.5"`` is not a number and ``true``
is not an integer (as OpenAI answers), and fields medlora does not know are ignored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..inference.backend import SEED_LIMIT, GenerationParams, preset

MIN_TEMPERATURE = 0.01  # below this, sampling divides the logits into overflow: treated as greedy (temperature 0)
SEED_MODULUS = SEED_LIMIT  # any integer seed an OpenAI client sends, taken modulo the seeds both backends take


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "service_unavailable", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None)
    n: int | None = Field(None, ge=1, le=1)
    repetition_penalty: float | None = Field(None, ge=0.1, le=10)  # vLLM's extension; OpenAI has none

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 stop sequences", "stop")
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _param(loc: tuple) -> str | None:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def parse_request(raw: bytes) -> ChatRequest:
    """The request, or an ApiError(400) naming the first thing wrong with it."""
    try:
        return ChatRequest.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON ({err['msg'].removeprefix('Invalid JSON: ')})",
                           code="invalid_json") from None
        # a union names every branch it tried (messages[0].content.str); the field itself is the param
        loc = tuple(p for p in err["loc"] if p not in ("str", "list[TextPart]", "list[str]", "function-after"))
        param = _param(loc)
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from None


@dataclass(frozen=True)
class Defaults:
    """The server's settings for what a request leaves out, and its limits."""

    mode: str = "greedy"           # decoding when the request sends no temperature
    max_new_tokens: int = 256      # answer length when the request sends no max_tokens
    max_tokens_limit: int = 1024   # the largest max_tokens a request may ask for


def generation_params(req: ChatRequest, defaults: Defaults) -> tuple[GenerationParams, bool]:
    """medlora's decoding settings for this request, and whether max_tokens was asked for (not defaulted).

    temperature 0 (or below 0.01), or top_p 0, is greedy; another temperature samples with it; no temperature
    uses the server's --mode. top_p and repetition_penalty apply when sampling."""
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if asked is not None and asked > defaults.max_tokens_limit:
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise ApiError(400, f"{field} is {asked}, above this server's limit of {defaults.max_tokens_limit} "
                            "(--max_tokens_limit)", field, "max_tokens_too_large")
    max_new = asked if asked is not None else min(defaults.max_new_tokens, defaults.max_tokens_limit)
    if req.temperature is not None:
        mode = "greedy" if req.temperature < MIN_TEMPERATURE else "sample"
    else:
        mode = defaults.mode
    if req.top_p == 0:
        mode = "greedy"
    seed = None if req.seed is None else req.seed % SEED_MODULUS
    if mode == "greedy":
        return preset("greedy", max_new_tokens=max_new, repetition_penalty=req.repetition_penalty,
                      seed=seed), asked is not None
    return preset("sample", max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                  repetition_penalty=req.repetition_penalty, seed=seed), asked is not None
