"""OpenAI request schemas and response bodies the server speaks (completions, chat, vLLM's adapter routes).

Requests accept unknown fields (clients send many); the fields we honour are validated here and
anything we cannot honour (n > 1, logprobs, vLLM's guided decoding, ...) is refused with a 400 that
names the field.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from loratune.module_patterns import shown

from .registry import RequestError

# Fields we accept only at their neutral values (OpenAI's defaults, and vLLM's for its extra
# sampling fields): any other value would be silently ignored, so it is refused by name.
UNSUPPORTED = {"logprobs": (False, 0), "top_logprobs": (0,), "best_of": (1,), "echo": (False,),
               "suffix": ("",), "logit_bias": ({},), "presence_penalty": (0, 0.0),
               "frequency_penalty": (0, 0.0), "tools": ([],), "tool_choice": ("none", "auto"),
               "functions": ([],), "function_call": ("none", "auto"),
               "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (),
               "top_k": (-1, 0), "min_p": (0, 0.0), "repetition_penalty": (1, 1.0), "ignore_eos": (False,),
               "min_tokens": (0,), "stop_token_ids": ([],), "add_generation_prompt": (True,),
               "continue_final_message": (False,),
               # vLLM's own fields that would change what is generated or returned (no neutral value:
               # any value at all is refused)
               "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
               "structured_outputs": (), "allowed_token_ids": (), "bad_words": ([],),
               "use_beam_search": (False,), "length_penalty": (1, 1.0), "truncate_prompt_tokens": (),
               "prompt_logprobs": (), "return_tokens_as_token_ids": (False,),
               "include_stop_str_in_output": (False,), "skip_special_tokens": (True,),
               "spaces_between_special_tokens": (True,), "chat_template": (), "chat_template_kwargs": ({},),
               "documents": ([],)}
STREAM_OPTIONS = ("include_usage", "continuous_usage_stats")
CHAT_ROLES = ("system", "developer", "user", "assistant")
# Every stop string is checked against the end of the text after each token, on the event loop:
# the cost grows with their number times their length, so both are bounded (OpenAI allows 4).
MAX_STOPS = 16
MAX_STOP_CHARS = 256


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1)
    n: StrictInt | None = 1
    stream: StrictBool | None = False
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch.Generator accepts
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None

    def check_supported(self) -> None:
        """Refuse, by name, request fields set to something the server cannot honour."""
        if self.n not in (None, 1):
            raise RequestError(400, f"n={shown(self.n)} is not supported; the server returns one choice "
                               "(n=1)", param="n")
        if self.stream_options and not self.stream:
            raise RequestError(400, "stream_options is only allowed when stream is true",
                               param="stream_options")
        self._check_stream_options()
        if self.logprobs is not None and self.logprobs is not False:  # completions' 0 asks for them too
            raise RequestError(400, f"logprobs={shown(self.logprobs)} is not supported by this server",
                               param="logprobs")
        extra = self.model_extra or {}
        for name, neutral in UNSUPPORTED.items():
            value = extra.get(name)
            if value is not None and value not in neutral:
                raise RequestError(400, f"{name}={shown(value)} is not supported by this server", param=name)
        self._check_stop()

    def _check_stream_options(self) -> None:
        for key, value in (self.stream_options or {}).items():
            if key not in STREAM_OPTIONS:
                raise RequestError(400, f"stream_options.{shown(key)} is not a stream option; known: "
                                   f"{', '.join(STREAM_OPTIONS)}", param="stream_options")
            if value is not None and not isinstance(value, bool):
                raise RequestError(400, f"stream_options.{key} must be true or false, got {shown(value)}",
                                   param="stream_options")
        if (self.stream_options or {}).get("continuous_usage_stats"):
            raise RequestError(400, "stream_options.continuous_usage_stats is not supported by this server; "
                               "include_usage reports usage in the last chunk", param="stream_options")

    def _check_stop(self) -> None:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOPS:
            raise RequestError(400, f"stop holds {len(stops)} strings; at most {MAX_STOPS} are accepted",
                               param="stop")
        longest = max((len(s) for s in stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise RequestError(400, f"stop holds a string of {longest} characters; at most {MAX_STOP_CHARS} "
                               "are accepted", param="stop")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr] | list[StrictInt]  # strict: lax, [true] would be token id 1


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: StrictStr | None = None

    def text(self, where: str) -> str:
        """The message's text; `where` names it in errors (messages[i])."""
        if self.role not in CHAT_ROLES:
            raise RequestError(400, f"{where}.role {shown(self.role)} is not supported; use one of "
                               f"{', '.join(CHAT_ROLES)}", param="messages")
        for name in ("tool_calls", "function_call"):  # the template would drop them without a word
            if (self.model_extra or {}).get(name):
                raise RequestError(400, f"{where}.{name} is not supported: this server does not call tools",
                                   param="messages")
        if self.content is None and self.role != "assistant":
            raise RequestError(400, f"{where}.content is missing", param="messages")
        if isinstance(self.content, list):
            parts = []
            for i, part in enumerate(self.content):
                if part.get("type") != "text":
                    raise RequestError(400,
                                       f"{where}.content[{i}] has type {shown(part.get('type'))}, which is "
                                       "not supported; send text parts", param="messages")
                if not isinstance(part.get("text"), str):
                    raise RequestError(400, f"{where}.content[{i}].text must be a string", param="messages")
                parts.append(part["text"])
            return "\n".join(parts)  # as vLLM joins them
        return self.content or ""

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role  # OpenAI's newer name for system


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    lora_name: str | None = None
    lora_path: str | None = None
    load_inplace: StrictBool = False  # vLLM's: replace the adapter already loaded under lora_name


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    lora_name: str | None = None
    lora_int_id: StrictInt | None = None  # strict: lax, `true` would unload id 1


def error_body(message: str, type: str, code: str | int | None = None, param: str | None = None) -> dict:
    """The OpenAI error envelope: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class Head:
    """What every body and chunk of one response repeats: its id, its creation time and the model."""

    id: str
    created: int
    model: str


def new_head(prefix: str, model: str) -> Head:
    return Head(new_id(prefix), int(time.time()), model)


def completion_body(head: Head, text: str, finish: str | None, use: dict | None, *,
                    chunk: bool = False) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    body = {"id": head.id, "object": "text_completion", "created": head.created, "model": head.model,
            "choices": [choice]}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(head: Head, text: str, finish: str | None, use: dict) -> dict:
    message = {"role": "assistant", "content": text}
    return {"id": head.id, "object": "chat.completion", "created": head.created, "model": head.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": use}


def chat_chunk(head: Head, delta: dict, finish: str | None, *, use: dict | None = None,
               empty: bool = False) -> dict:
    choices = [] if empty else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {"id": head.id, "object": "chat.completion.chunk", "created": head.created, "model": head.model,
            "choices": choices}
    if use is not None:
        body["usage"] = use
    return body
