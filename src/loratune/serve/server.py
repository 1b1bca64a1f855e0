"""Assemble a server: load the base and tokenizer, start the engine, load the startup adapters.

`build_server` returns the ASGI app and its state; `serve_forever` runs it under uvicorn and stops
the engine on exit. The CLI (`loratune serve`) and the tests both go through `build_server`.
"""

from __future__ import annotations

import logging
import threading

import torch
from fastapi import FastAPI

from loratune.errors import UnsupportedFeatureError
from loratune.tools.generation import stop_token_ids
from loratune.tools.loading import load_base_model, load_tokenizer

from .api import build_app
from .engine import Engine, GenerationRequest
from .lora_rows import linear_shapes
from .sampling import SamplingParams
from .state import ServerState, ServeSettings

log = logging.getLogger(__name__)


def build_server(model, tokenizer, settings: ServeSettings, *, adapters: dict[str, str] | None = None,
                 max_batch_size: int = 16, max_queue: int = 64, context_length: int | None = None,
                 num_threads: int | None = None) -> tuple[FastAPI, ServerState]:
    """Start an engine on `model` (loaded, frozen) and return the app and its state.

    Raises:
        AdapterError / UnsupportedFeatureError: a startup adapter does not fit the base.
    """
    context = context_length or getattr(model.config, "max_position_embeddings", None) or 2048
    engine = Engine(model, eos_token_ids=set(stop_token_ids(model, tokenizer)), context_length=context,
                    max_batch_size=max_batch_size, max_queue=max_queue, num_threads=num_threads)
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    state = ServerState(engine, tokenizer, settings, linear_shapes(model), dtype)
    state.sampling_defaults = sampling_defaults(model)
    engine.start()
    try:
        warm_up(engine, tokenizer.bos_token_id or 0)
        for name, path in (adapters or {}).items():
            state.load_startup_adapter(name, path)
            log.info("loaded adapter %r from %s", name, path)
    except Exception:
        engine.stop()
        raise
    return build_app(state), state


# What vLLM takes from a model's generation_config.json as the defaults of requests that omit them;
# the first two are applied here, the others cannot be (the server refuses them in requests too).
_APPLIED = {"temperature": (0.0, 2.0), "top_p": (1e-9, 1.0)}
_NOT_APPLIED = ("top_k", "min_p", "repetition_penalty")


def sampling_defaults(model) -> dict[str, float]:
    """The temperature and top_p a request gets when it sets none: the model's generation_config's, as
    vLLM does (Llama-3-Instruct's, for one, say 0.6 and 0.9), else 1.0."""
    config = getattr(model, "generation_config", None)
    try:
        given = config.to_diff_dict() if config is not None else {}
    except Exception:  # a generation_config of another kind: nothing to take
        given = {}
    defaults = {}
    for key, (low, high) in _APPLIED.items():
        value = given.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high:
            defaults[key] = float(value)
        elif value is not None:
            log.warning("the model's generation_config sets %s=%r, outside [%g, %g]; not used", key, value,
                        low, high)
    ignored = {k: given[k] for k in _NOT_APPLIED if given.get(k) is not None}
    if defaults or ignored:
        log.info("request defaults from the model's generation_config: %s%s", defaults or "none",
                 f" (not applied: {ignored})" if ignored else "")
    return defaults


def warm_up(engine: Engine, token_id: int) -> None:
    """Run one tiny request (prefill + a decode step) so a model the engine cannot serve fails now.

    Raises:
        UnsupportedFeatureError: the request failed (e.g. a sliding-window cache), with the reason.
    """
    done, outcome = threading.Event(), {}

    def sink(kind, value):
        if kind != "token":
            outcome[kind] = value
            done.set()

    request = GenerationRequest([token_id, token_id], None, SamplingParams(max_tokens=2, temperature=0), sink)
    engine.submit(request)
    if not done.wait(300) or "error" in outcome:
        reason = request.error_detail or outcome.get("error", "warm-up timed out")
        raise UnsupportedFeatureError(f"the base model cannot be served: {reason}")


def load_and_build(model_name_or_path: str, settings: ServeSettings, *, dtype: str = "auto",
                   device: str = "cpu", quantization: dict | None = None,
                   **kwargs) -> tuple[FastAPI, ServerState]:
    """Load the base model onto `device` (optionally quantized: load_base_model's load_in_4bit/8bit
    keys) and its tokenizer by name or path, then `build_server`."""
    model = load_base_model(model_name_or_path, dtype=dtype, device=device, **(quantization or {}))
    tokenizer = load_tokenizer(model_name_or_path)
    return build_server(model, tokenizer, settings, **kwargs)


def uvicorn_settings(settings: ServeSettings) -> dict:
    """uvicorn's limits against slow or too many clients (the body timeout is GuardMiddleware's).

    A connection that has not sent its headers within header_timeout_s is closed (HeaderTimeoutH11);
    an idle keep-alive connection after keep_alive_s; beyond max_connections uvicorn answers 503.
    """
    from .slow_clients import header_timeout_protocol

    return {"timeout_keep_alive": settings.keep_alive_s, "limit_concurrency": settings.max_connections,
            "h11_max_incomplete_event_size": 64 * 1024, "backlog": 256,
            "http": header_timeout_protocol(settings.header_timeout_s)}


def serve_forever(app: FastAPI, state: ServerState, *, host: str, port: int, log_level: str = "info") -> None:
    """Run uvicorn until interrupted, then stop the engine."""
    import uvicorn

    try:
        uvicorn.run(app, **uvicorn_settings(state.settings), host=host, port=port, log_level=log_level,
                    timeout_graceful_shutdown=5)
    finally:
        state.engine.stop()
