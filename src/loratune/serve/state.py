"""What the HTTP layer knows: settings, visible adapters, and streaming one generation from the engine.

`ServerState` maps served model names to engine adapter ids. An adapter becomes visible only after
it was read, validated and installed by the engine; unloading hides it at once, and the engine drops
its weights when the requests already using it finish. `Generation` turns engine events (delivered
from the engine thread onto this event loop) into text deltas, applying stop strings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratune.errors import ConfigError, LoratuneError
from loratune.module_patterns import shown

from .engine import AdapterGoneError, Engine, EngineStoppedError, GenerationRequest, QueueFullError
from .metrics import ServerMetrics
from .registry import RequestError, check_adapter_name, prepare_adapter, resolve_adapter_path
from .sampling import SamplingParams


@dataclass
class ServeSettings:
    """Server-wide settings (the `loratune serve` flags)."""

    base_name: str
    """Model name of the base in requests and /v1/models (`--served-model-name`)."""
    base_root: str = ""
    """Where the base came from, shown as `root` in /v1/models."""
    api_keys: list[str] = field(default_factory=list)
    """Accepted bearer keys for /v1/*; empty = no auth."""
    adapter_roots: list[Path] = field(default_factory=list)
    """Directories runtime-loaded adapters must lie under; empty = runtime loading disabled."""
    max_loaded: int = 32
    """Most adapters loaded at once."""
    max_request_tokens: int | None = None
    """Largest prompt + max_tokens one request may ask for (413 above)."""
    max_body_bytes: int = 1 << 20
    """Largest request body (413 above)."""
    body_timeout_s: float = 30.0
    """Longest wait for the next chunk of a request body (408 after)."""
    header_timeout_s: float = 10.0
    """Longest time a new connection may take to send its request line and headers (then closed)."""
    keep_alive_s: float = 5.0
    """How long an idle keep-alive connection stays open."""
    max_connections: int = 512
    """Most connections at once; over it new requests get 503 (uvicorn's limit_concurrency)."""


@dataclass
class AdapterEntry:
    name: str
    path: str
    adapter_id: int
    created: int = field(default_factory=lambda: int(time.time()))


def token_rows(model, tokenizer) -> int:
    """How many token ids a prompt may use: the tokenizer's and the model's embedding rows, the fewer.

    A tokenizer can hold more tokens than the embedding has rows (tokens added without resizing the
    model); an id in that gap would fail the whole batched step it is prefilled in.
    """
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    tokens = len(tokenizer) if hasattr(type(tokenizer), "__len__") else None
    sizes = [n for n in (tokens, getattr(embedding, "num_embeddings", None)) if isinstance(n, int)]
    return min(sizes, default=2**63)


class ServerState:
    """Adapters by name, the tokenizer, the engine and metrics of one server."""

    def __init__(self, engine: Engine, tokenizer, settings: ServeSettings,
                 shapes: dict[str, tuple[int, int]], dtype: torch.dtype):
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.shapes, self.dtype = shapes, dtype
        self.adapters: dict[str, AdapterEntry] = {}
        self._loading: set[str] = set()
        self._ids = itertools.count(1)
        self.created = int(time.time())
        self.sampling_defaults: dict[str, float] = {}  # temperature / top_p of requests that omit them
        self.vocab = token_rows(engine.model, tokenizer)  # prompt ids must be below this
        self.metrics = ServerMetrics(queue_depth=lambda: engine.queue_depth, running=lambda: engine.running,
                                     loaded_adapters=lambda: len(self.adapters),
                                     served=lambda name: name == settings.base_name or name in self.adapters)
        # Prompts are tokenized on one worker thread, so the event loop keeps streaming meanwhile (a
        # 900 KB prompt takes about 0.35 s to tokenize on a Zen 5 EPYC core, and the Rust tokenizer
        # lets go of the GIL).
        # One thread keeps those calls in order; decoding on the loop only reads the tokenizer. The
        # first call clears any truncation or padding a tokenizer.json sets, so it is made here,
        # before anything else can use the tokenizer at the same time.
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        with contextlib.suppress(Exception):
            tokenizer("a", add_special_tokens=True)

    async def tokenize(self, fn, *args):
        """`fn(*args)` (a prompt's tokenization) on the tokenizing thread; its errors are raised here."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    # ----- adapters ----------------------------------------------------------------------------

    def adapter_id(self, model: str) -> int | None:
        """Return the engine adapter id for a request's `model` (None = base); 404 if unknown."""
        if model == self.settings.base_name:
            return None
        entry = self.adapters.get(model)
        if entry is None:
            raise _no_such_model(model)
        return entry.adapter_id

    def load_startup_adapter(self, name: str, path: str) -> None:
        """Load an adapter named on the command line (any path; the operator chose it). Blocks."""
        try:
            check_adapter_name(name, base_name=self.settings.base_name)
        except RequestError as exc:
            raise ConfigError(f"--adapter {name}=...: {exc.message}") from None
        if name in self.adapters:
            raise ConfigError(f"adapter name {name!r} is given twice")
        prepared = prepare_adapter(name, Path(path).resolve(), self.shapes, self.dtype)
        adapter_id = next(self._ids)
        self.engine.install_adapter(adapter_id, prepared).result()
        self.adapters[name] = AdapterEntry(name, prepared.path, adapter_id)

    async def load_adapter(self, name: str, lora_path: str, *, inplace: bool = False) -> None:
        """Validate, read and install an adapter requested over HTTP; raises RequestError.

        `inplace` (vLLM's load_inplace): an adapter already loaded under `name` is replaced once the new
        one is installed; requests already running on the old one finish on it.
        """
        check_adapter_name(name, base_name=self.settings.base_name)
        replacing = inplace and name in self.adapters
        if (name in self.adapters and not replacing) or name in self._loading:
            raise RequestError(400, f"The lora adapter '{name}' has already been loaded.",  # vLLM's words
                               type="InvalidUserInput", code=400)
        path = resolve_adapter_path(lora_path, self.settings.adapter_roots)
        if not path.is_dir():
            raise RequestError(404, f"Loading lora {name} failed: No adapter found for {shown(lora_path)}",
                               type="NotFoundError", code=404)
        if len(self.adapters) + len(self._loading) - replacing >= self.settings.max_loaded:
            raise RequestError(400, f"cannot load {name!r}: {self.settings.max_loaded} adapters are loaded "
                               "(--max-loaded); unload one first", type="BadRequestError", code=400)
        self._loading.add(name)
        try:
            try:
                prepared = await asyncio.to_thread(prepare_adapter, name, path, self.shapes, self.dtype,
                                                   roots=self.settings.adapter_roots)
            except LoratuneError as exc:
                message = str(exc).replace(str(path), lora_path)  # the client's words, not the server's paths
                raise RequestError(400, f"Loading lora {name} failed: {_cut(message)}",
                                   type="BadRequestError", code=400) from None
            except OSError as exc:  # e.g. a name too long for the file system; the path stays private
                raise RequestError(400, f"Loading lora {name} failed: cannot read the adapter files "
                                   f"({exc.strerror or type(exc).__name__})", type="BadRequestError",
                                   code=400) from None
            adapter_id = next(self._ids)
            install = self._engine_call(lambda: self.engine.install_adapter(adapter_id, prepared))
            try:
                await asyncio.wrap_future(install)
            except EngineStoppedError as exc:  # the server stopped before the engine ran the install
                raise _unavailable(exc) from None
            except asyncio.CancelledError:
                if not install.cancelled():  # installed all the same: nothing will name it, free it
                    with contextlib.suppress(EngineStoppedError):
                        self.engine.remove_adapter(adapter_id)
                raise
            old = self.adapters.get(name)
            self.adapters[name] = AdapterEntry(name, prepared.path, adapter_id)
        finally:
            self._loading.discard(name)
        if old is not None:  # replaced in place: new requests find the new one, the old one goes when unused
            with contextlib.suppress(EngineStoppedError, RequestError):
                await asyncio.shield(asyncio.wrap_future(self.engine.remove_adapter(old.adapter_id)))

    async def unload_adapter(self, name: str | None, adapter_id: int | None) -> str:
        """Hide an adapter now and free its weights once unused; returns its name."""
        if not name and adapter_id is None:
            raise RequestError(400, "either 'lora_name' and 'lora_int_id' needs to be provided.",
                               type="InvalidUserInput", code=400)
        entry = self.adapters.get(name) if name else next(
            (e for e in self.adapters.values() if e.adapter_id == adapter_id), None)
        if entry is None:
            which = shown(name) if name else f"with lora_int_id {shown(adapter_id)}"
            raise RequestError(404, f"The lora adapter {which} cannot be found.", type="NotFoundError",
                               code=404)
        del self.adapters[entry.name]  # new requests stop finding it at once
        try:
            # shielded: the name is gone already, so the weights must go too if this caller stops waiting
            await asyncio.shield(asyncio.wrap_future(
                self._engine_call(lambda: self.engine.remove_adapter(entry.adapter_id))))
        except RequestError:  # the engine did not take the removal: the adapter is still loaded
            self.adapters[entry.name] = entry
            raise
        except EngineStoppedError as exc:  # taken, but the server stopped before it ran
            self.adapters[entry.name] = entry
            raise _unavailable(exc) from None
        self.metrics.forget(entry.name)
        return entry.name

    def _engine_call(self, start):
        try:
            return start()
        except EngineStoppedError as exc:
            raise _unavailable(exc) from None

    # ----- requests ----------------------------------------------------------------------------

    def sampling(self, prompt_len: int, max_tokens: int | None, temperature: float | None,
                 top_p: float | None, seed: int | None, *, prompt_field: str = "prompt",
                 max_tokens_field: str = "max_tokens") -> SamplingParams:
        """Check the request's token budget and build its sampling parameters.

        prompt_field: the request field that holds the prompt ("prompt" or "messages"), named when the
        prompt alone leaves no room; max_tokens_field: the field that set max_tokens (chat's
        "max_completion_tokens" or "max_tokens"), named when it asks for too much.
        """
        if prompt_len == 0:
            raise RequestError(400, "the prompt is empty", param=prompt_field)
        context = self.engine.context_length
        limit = self.settings.max_request_tokens
        if max_tokens is None:  # as much as fits, like vLLM
            room = min(context, limit or context)
            if prompt_len >= room:  # the client set no max_tokens: the prompt is what does not fit
                within = (f"this model's maximum context length of {context} tokens" if room == context
                          else f"this server's limit of {limit} tokens a request (--max-request-tokens)")
                raise RequestError(
                    400 if room == context else 413,
                    f"the prompt is {prompt_len} tokens, which leaves no room for a completion within "
                    f"{within}; shorten the {prompt_field}", param=prompt_field,
                    code="context_length_exceeded" if room == context else "request_too_large")
            max_tokens = room - prompt_len
        total = prompt_len + max_tokens
        if total > context:
            raise RequestError(400, f"This model's maximum context length is {context} tokens. However, you "
                               f"requested {total} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                               f"completion). Please reduce the length of the prompt or {max_tokens_field}.",
                               param=max_tokens_field, code="context_length_exceeded")
        if limit is not None and total > limit:
            raise RequestError(413, f"the request needs {total} tokens ({prompt_len} prompt + {max_tokens} "
                               f"{max_tokens_field}), over this server's limit of {limit} "
                               "(--max-request-tokens)",
                               param=max_tokens_field, code="request_too_large")
        if temperature is None:
            temperature = self.sampling_defaults.get("temperature", 1.0)
        if top_p is None:
            top_p = self.sampling_defaults.get("top_p", 1.0)
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


def _cut(message: str, limit: int = 2000) -> str:
    """An error message short enough for a reply (a hostile file can make it megabytes long)."""
    return message if len(message) <= limit else f"{message[:limit]}... ({len(message)} characters)"


class Generation:
    """One request in flight: submit it, then read text deltas until it finishes."""

    def __init__(self, state: ServerState, model: str, adapter_id: int | None, prompt_ids: list[int],
                 params: SamplingParams, stops: list[str]):
        self.state, self.model, self.stops = state, model, stops
        self.prompt_tokens = len(prompt_ids)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._sent = ""
        self._text, self._prefix, self._read = "", 0, 0  # what `_decode` has settled, and from which tokens
        self._start = time.monotonic()
        self.request = GenerationRequest(prompt_ids, adapter_id, params, self._sink)

    def _sink(self, kind: str, value: object) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))

    def submit(self) -> None:
        try:
            self.state.engine.submit(self.request)
        except QueueFullError as exc:
            raise RequestError(429, str(exc), type="rate_limit_error", code="queue_full") from None
        except EngineStoppedError as exc:
            raise _unavailable(exc) from None
        except AdapterGoneError:  # unloaded after the handler looked it up
            raise _no_such_model(self.model) from None

    def cancel(self) -> None:
        self.request.cancelled = True

    async def deltas(self):
        """Yield text deltas; afterwards `finish_reason` and `tokens` are set."""
        metrics = self.state.metrics
        while True:
            kind, value = await self._queue.get()
            if kind == "error":
                raise RequestError(500, str(value), type="server_error", code="generation_failed")
            if kind == "token":
                if not self.tokens:
                    metrics.ttft.labels(metrics.model(self.model)).observe(time.monotonic() - self._start)
                self.tokens.append(value)
            text = self._decode()
            cut = self._find_stop(text)
            if cut is not None:
                text, self.finish_reason = text[:cut], "stop"
                self.cancel()
            elif kind == "finish":
                self.finish_reason = str(value)
            elif text.endswith("\ufffd"):
                continue  # an incomplete UTF-8 sequence: wait for the next token
            else:
                text = text[: len(text) - self._partial_stop(text)]  # may still grow into a stop string
            delta, self._sent = text[len(self._sent):], max(text, self._sent, key=len)
            if delta:
                yield delta
            if self.finish_reason is not None:
                metrics.latency.labels(metrics.model(self.model)).observe(time.monotonic() - self._start)
                metrics.tokens.labels(metrics.model(self.model)).inc(len(self.tokens))
                metrics.prompt_tokens.labels(metrics.model(self.model)).inc(self.prompt_tokens)
                return

    def _decode(self) -> str:
        """The text of all tokens so far, decoding only the tokens since the last settled point.

        Decoding everything again at every token costs O(n) per token (2.5 ms at 16k tokens on a Zen 5
        EPYC core, on the event loop). Instead the tokens after `_prefix` are decoded with and without
        the newest ones, and the difference is the new text; it settles (and `_prefix` moves on) once
        it does not end in an incomplete UTF-8 sequence, so a character split over tokens is never
        cut. The window
        starts one step back, so tokenizers that drop a leading space on a first token (SentencePiece)
        drop it from both decodes alike.
        """
        decode = self.state.tokenizer.decode
        window = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        new = decode(self.tokens[self._prefix:], skip_special_tokens=True)
        text = self._text + new[len(window):]
        if len(new) > len(window) and not new.endswith("\ufffd"):
            self._text, self._prefix, self._read = text, self._read, len(self.tokens)
        return text

    async def text(self) -> str:
        return "".join([d async for d in self.deltas()])

    def _partial_stop(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        for k in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0

    def _find_stop(self, text: str) -> int | None:
        if not self.stops:
            return None
        start = max(0, len(self._sent) - max(len(s) for s in self.stops))
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None


def _unavailable(exc: EngineStoppedError) -> RequestError:
    return RequestError(503, str(exc), type="server_error", code="engine_unavailable")


def _no_such_model(model: str) -> RequestError:
    shown_model = model if len(model) <= 200 else f"{model[:200]}... ({len(model)} characters)"
    return RequestError(404, f"The model `{shown_model}` does not exist.", type="NotFoundError",
                        code="model_not_found", param="model")
