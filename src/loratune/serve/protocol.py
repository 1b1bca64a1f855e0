"""OpenAI request schemas and response bodies the server speaks (completions, chat, vLLM's adapter routes).

Requests accept unknown fields (clients send many); the fields we honour are validated here and
anything we cannot honour (n > 1, logprobs) is refused with a 400 that names the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .registry import RequestError

# Fields we accept only at their neutral values (OpenAI's defaults).
UNSUPPORTED = {"logprobs": (False, 0), "top_logprobs": (0,), "best_of": (1,), "echo": (False,), "suffix": ("",),
               "logit_bias": ({},), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
               "tools": ([],), "response_format": ({"type": "text"},)}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = 1
    stream: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch.Generator accepts
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None

    def check_supported(self) -> None:
        """Refuse, by name, request fields set to something the server cannot honour."""
        if self.n not in (None, 1):
            raise RequestError(400, f"n={self.n} is not supported; the server returns one choice (n=1)", param="n")
        extra = {**(self.model_extra or {}), "logprobs": self.logprobs}
        for name, neutral in UNSUPPORTED.items():
            value = extra.get(name)
            if value is not None and value not in neutral:
                raise RequestError(400, f"{name}={value!r} is not supported by this server", param=name)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise RequestError(400, f"message content of type {part.get('type')!r} is not supported; "
                                       "send text parts", param="messages")
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    lora_name: str | None = None
    lora_path: str | None = None


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    lora_name: str | None = None
    lora_int_id: int | None = None


def error_body(message: str, type: str, code: str | int | None = None, param: str | None = None) -> dict:
    """The OpenAI error envelope: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str | None, use: dict | None,
                    *, chunk: bool = False) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice]}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, text: str, finish: str | None, use: dict) -> dict:
    message = {"role": "assistant", "content": text}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, *, use: dict | None = None,
               empty: bool = False) -> dict:
    choices = [] if empty else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}
    if use is not None:
        body["usage"] = use
    return body
