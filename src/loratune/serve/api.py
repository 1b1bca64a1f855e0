"""FastAPI routes of the OpenAI-compatible server; handlers talk to the engine, never to the model.

Routes: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming ending in `data: [DONE]`),
vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, /health (no auth), /metrics (Prometheus),
and the playground at /. Every error is OpenAI's envelope {"error": {message, type, param, code}}:
400 bad JSON/schema/names/paths/context, 401 key, 404 model, 413 body or token limit, 429 full queue,
503 engine down. Auth and the body size limit are an ASGI middleware (guard.py) so they apply
before parsing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loratune.errors import ConfigError
from loratune.module_patterns import shown
from loratune.tools.generation import chat_ids, prompt_ids

from . import protocol as p
from .guard import GuardMiddleware
from .registry import RequestError
from .state import Generation, ServerState

log = logging.getLogger(__name__)


def build_app(state: ServerState) -> FastAPI:
    """Return the ASGI app serving this state's engine and adapters."""
    app = FastAPI(title="loratune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = state
    app.add_middleware(GuardMiddleware, api_keys=state.settings.api_keys,
                       max_body_bytes=state.settings.max_body_bytes,
                       body_timeout_s=state.settings.body_timeout_s)
    _add_error_handlers(app)

    @app.api_route("/health", methods=["GET", "HEAD"])  # uptime monitors often probe with HEAD
    async def health():
        if not state.engine.alive:
            raise RequestError(503, "the engine is not running", type="server_error",
                               code="engine_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files("loratune.serve").joinpath("static/index.html").read_text())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": _model_cards(state)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):  # the openai client's models.retrieve
        state.adapter_id(model_id)  # a 404 naming it when it is not served
        return next(card for card in _model_cards(state) if card["id"] == model_id)

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request):
        body.check_supported()
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default here
        gen = await _generation(state, body, _completion_prompt, body.prompt, max_tokens)
        return await _respond(state, gen, body, request, "completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: p.ChatRequest, request: Request):
        body.check_supported()
        max_tokens = body.max_completion_tokens or body.max_tokens
        gen = await _generation(state, body, _chat_prompt, body.messages, max_tokens)
        return await _respond(state, gen, body, request, "chat", chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: p.LoadLoraRequest):
        if not body.lora_name or not body.lora_path:
            raise RequestError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                               type="InvalidUserInput", code=400)
        await state.load_adapter(body.lora_name, body.lora_path, inplace=body.load_inplace)
        log.info("loaded adapter %r from %r", body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: p.UnloadLoraRequest):
        name = await state.unload_adapter(body.lora_name, body.lora_int_id)
        log.info("unloaded adapter %r", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


def _model_cards(state: ServerState) -> list[dict]:
    """vLLM's /v1/models cards: the base (parent None) then each adapter (parent = base)."""
    def card(model_id, root, parent, created, max_len):
        permission = {"id": p.new_id("modelperm"), "object": "model_permission", "created": created,
                      "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                      "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                      "organization": "*", "group": None, "is_blocking": False}
        return {"id": model_id, "object": "model", "created": created, "owned_by": "loratune", "root": root,
                "parent": parent, "max_model_len": max_len, "permission": [permission]}

    base = state.settings.base_name
    cards = [card(base, state.settings.base_root or base, None, state.created, state.engine.context_length)]
    cards += [card(e.name, e.path, base, e.created, None) for e in state.adapters.values()]
    return cards


async def _generation(state: ServerState, body, tokenize, prompt, max_tokens: int | None) -> Generation:
    """The request's generation: its model checked, its prompt tokenized beside the event loop."""
    state.adapter_id(body.model)  # an unknown model is a 404 before any tokenizing
    prompt_ids = await state.tokenize(tokenize, state, prompt)
    _check_token_ids(state, prompt_ids, "messages" if isinstance(body, p.ChatRequest) else "prompt")
    # Looked up again after the wait, and `_respond` submits before its first await: an adapter
    # unloaded meanwhile is a 404 (one reloaded under the name, the new one), never the base model.
    adapter_id = state.adapter_id(body.model)
    chat = isinstance(body, p.ChatRequest)
    params = state.sampling(len(prompt_ids), max_tokens, body.temperature, body.top_p, body.seed,
                            prompt_field="messages" if chat else "prompt",
                            max_tokens_field="max_completion_tokens" if chat and body.max_completion_tokens
                            else "max_tokens")
    return Generation(state, body.model, adapter_id, prompt_ids, params, body.stops())


def _check_token_ids(state: ServerState, ids: list[int], field: str) -> None:
    """Refuse prompt ids the model has no embedding row for (sent as ids, or made by the tokenizer)."""
    bad = [t for t in ids if not 0 <= t < state.vocab]
    if bad:
        raise RequestError(400, f"{field} holds token ids {shown(bad[:5])} outside the model's vocabulary "
                           f"[0, {state.vocab})", param=field)


def _completion_prompt(state: ServerState, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise RequestError(400, f"prompt holds {len(prompt)} prompts; send one prompt per request",
                               param="prompt")
        prompt = prompt[0]
    try:
        # refuses "" and text that is not UTF-8 (JSON can carry it)
        return prompt_ids(state.tokenizer, prompt)
    except ConfigError as exc:
        raise RequestError(400, str(exc), param="prompt") from None


def _chat_prompt(state: ServerState, messages: list[p.ChatMessage]) -> list[int]:
    if not getattr(state.tokenizer, "chat_template", None):
        raise RequestError(400, "the base model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
    conversation = [{"role": m.template_role(), "content": m.text(f"messages[{i}]"),
                     **({"name": m.name} if m.name else {})}  # for templates that show it, as vLLM passes it
                    for i, m in enumerate(messages)]
    try:
        return chat_ids(state.tokenizer, conversation)
    except ConfigError as exc:  # text that is not UTF-8 (JSON escapes can carry lone surrogates)
        raise RequestError(400, str(exc), param="messages") from None
    except Exception as exc:  # a template's own raise_exception(), e.g. roles out of order
        raise RequestError(400, f"the chat template rejected the messages: {exc}", param="messages") from None


async def _respond(state: ServerState, gen: Generation, body, request: Request, endpoint: str, *, chat: bool):
    head = p.new_head("chatcmpl" if chat else "cmpl", body.model)
    gen.submit()
    if body.stream:
        return StreamingResponse(_stream(state, gen, body, head, endpoint, chat=chat),
                                 media_type="text/event-stream")
    text_task = asyncio.ensure_future(gen.text())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({text_task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not text_task.done():  # the client left: `finally` stops generating for it
            state.metrics.requests.labels(state.metrics.model(body.model), endpoint, "499").inc()
            return Response(status_code=499)
        text = text_task.result()
    except RequestError:
        state.metrics.requests.labels(state.metrics.model(body.model), endpoint, "500").inc()
        raise
    finally:
        gone.cancel()
        text_task.cancel()
        gen.cancel()  # no-op when finished; frees the slot if the client left or this handler was cancelled
    state.metrics.requests.labels(state.metrics.model(body.model), endpoint, "200").inc()
    use = p.usage(gen.prompt_tokens, len(gen.tokens))
    if chat:
        return p.chat_body(head, text, gen.finish_reason, use)
    return p.completion_body(head, text, gen.finish_reason, use)


async def _disconnected(request: Request, every: float = 0.25) -> None:
    """Return once the client has closed its connection.

    Polled: a non-streaming reply sends nothing before it is done.
    """
    while not await request.is_disconnected():
        await asyncio.sleep(every)


async def _stream(state: ServerState, gen: Generation, body, head: p.Head, endpoint: str, *, chat: bool):
    def event(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    status = "200"
    try:
        if chat:
            yield event(p.chat_chunk(head, {"role": "assistant", "content": ""}, None))
        async for delta in gen.deltas():
            yield event(p.chat_chunk(head, {"content": delta}, None) if chat
                        else p.completion_body(head, delta, None, None, chunk=True))
        finish = gen.finish_reason
        yield event(p.chat_chunk(head, {}, finish) if chat
                    else p.completion_body(head, "", finish, None, chunk=True))
        if body.include_usage():
            use = p.usage(gen.prompt_tokens, len(gen.tokens))
            yield event(p.chat_chunk(head, {}, None, use=use, empty=True) if chat
                        else {**p.completion_body(head, "", None, use, chunk=True), "choices": []})
        yield "data: [DONE]\n\n"
    except RequestError as exc:
        status = str(exc.status)
        yield event(p.error_body(exc.message, exc.type, exc.code, exc.param))
        yield "data: [DONE]\n\n"
    except BaseException:
        status = "499"  # the client went away
        raise
    finally:
        gen.cancel()
        state.metrics.requests.labels(state.metrics.model(body.model), endpoint, status).inc()


def _add_error_handlers(app: FastAPI) -> None:
    def reply(status: int, message: str, type: str, code=None, param=None) -> JSONResponse:
        # A message may quote the client's text, whose JSON escapes can carry lone surrogates (\ud800)
        # that UTF-8 cannot encode: write those back as escapes.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        return JSONResponse(p.error_body(message, type, code, param), status_code=status)

    @app.exception_handler(RequestError)
    async def request_error(_, exc: RequestError):
        response = reply(exc.status, exc.message, exc.type, exc.code, exc.param)
        if exc.status == 429:
            response.headers["Retry-After"] = "1"  # the queue drains in about a decode step or two
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return reply(400, "the request body is not valid JSON", "invalid_request_error", "invalid_json")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):  # e.g. curl -d without -H
            return reply(400, "the request body must be JSON sent with 'Content-Type: application/json' "
                         f"(got {kind or 'no Content-Type'})", "invalid_request_error",
                         "invalid_content_type")
        parts, param = [], None
        for e in errors[:5]:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            param = param or (loc[0] if loc else None)
            parts.append(f"{'.'.join(loc) or 'body'}: {_schema_message(e)}")
        return reply(400, "invalid request: " + "; ".join(parts), "invalid_request_error", "invalid_request",
                     param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's words for a body that is not UTF-8, nests too deeply or holds a number Python
            # will not convert (over 4300 digits)
            return reply(400, "the request body is not valid JSON, or not JSON this server reads (not UTF-8, "
                         "nested too deeply, or a number of over 4300 digits)", kind, "invalid_json")
        response = reply(exc.status_code, _route_message(request, exc), kind, exc.status_code)
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):  # only reached when GuardMiddleware is bypassed
        request_id = p.new_id("req")
        log.error("internal error (request id %s)", request_id, exc_info=exc)
        return reply(500, f"internal error (request id {request_id})", "server_error", "internal_error")


def _schema_message(error: dict) -> str:
    """Pydantic's message for one schema error, except where it does not say what is wrong."""
    if error.get("type") == "string_unicode":  # an unknown field whose name is a lone surrogate escape
        return f"the field name {shown(error.get('input'))} is not valid Unicode (a lone surrogate)"
    return str(error.get("msg"))


def _route_message(request: Request, exc: StarletteHTTPException) -> str:
    """Name the method and path a 404 or 405 is about (Starlette says only "Not Found")."""
    route = f"{request.method} {shown(request.url.path)}"
    if exc.status_code == 404:
        served = ", ".join(r.path.replace(":path", "") for r in request.app.routes)
        return f"{route}: no such route; this server serves {served}"
    if exc.status_code == 405:
        return f"{route}: method not allowed; use {(exc.headers or {}).get('Allow', 'another method')}"
    return str(exc.detail)
