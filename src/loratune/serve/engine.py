"""The engine: one thread that owns the model and runs continuous batching with a KV cache.

HTTP handlers never touch the model. They `submit` a `GenerationRequest` (a bounded queue; full ->
`QueueFullError`) and receive events through the request's `sink` callback, called from the engine
thread: ("token", id) for every sampled token (EOS included), then ("finish", reason) with reason
"stop" (EOS), "length" (max_tokens or the context), or ("error", message). Adapter installs and
removals are commands the engine runs between decode steps (`call`), so they never race a forward.

Each loop iteration: run commands, drop cancelled rows, admit waiting requests (prefilled together,
then merged into the batch cache), and run one decode step for every running row. Rows of
different adapters share the step through `lora_rows.set_rows`. Greedy rows (temperature 0) take
the argmax, which is what `generate(do_sample=False)` takes, so their tokens equal a single run's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from loratune.serve.batch_cache import BatchCache, check_cache
from loratune.serve.lora_rows import RowAdapterWeights, RowLoraLinear, ensure_row_lora, set_rows
from loratune.serve.registry import PreparedAdapter
from loratune.serve.sampling import SamplingParams, finite_rows, sample

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


class EngineStoppedError(Exception):
    """The engine thread is not running (HTTP 503)."""


class AdapterGoneError(Exception):
    """The request names an adapter the engine does not hold, or one being removed (HTTP 404)."""


@dataclass
class GenerationRequest:
    """One generation: prompt token ids, the adapter (None = base) and where events go."""

    prompt_ids: list[int]
    adapter_id: int | None
    params: SamplingParams
    sink: Callable[[str, object], None]
    cancelled: bool = False
    released: bool = False  # its adapter use was given back (exactly once)
    error_detail: str | None = None  # why it failed, for the log and the operator; never sent to clients
    request_id: int = field(default_factory=itertools.count().__next__)


@dataclass
class _Row:
    request: GenerationRequest
    last_token: int
    position: int          # position id of last_token
    generated: int         # tokens sampled so far
    generator: torch.Generator | None


class Engine:
    """Owns the model on one thread; batches requests for any mix of adapters."""

    def __init__(self, model: nn.Module, *, eos_token_ids: set[int], context_length: int,
                 max_batch_size: int = 16, max_queue: int = 64, num_threads: int | None = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.num_threads = num_threads
        self.eos_token_ids = set(eos_token_ids)
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._lock = threading.Condition()
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._commands: collections.deque = collections.deque()
        self._users: collections.Counter[int] = collections.Counter()
        self._installed: set[int] = set()   # adapter ids whose weights are in the model
        self._doomed: set[int] = set()      # adapters unloaded but still used by requests
        self._rows: list[_Row] = []
        self._batch = BatchCache()
        self._planned: tuple | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.prefill_token_budget = 8192  # padded prompt tokens per prefill forward
        self.decode_steps = 0
        self.decoded_tokens = 0

    # ----- called from any thread --------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loratune-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request. Raises QueueFullError, EngineStoppedError or AdapterGoneError."""
        with self._lock:
            if not self.alive:
                raise EngineStoppedError("the engine is not running")
            gone = request.adapter_id is not None and (request.adapter_id not in self._installed
                                                       or request.adapter_id in self._doomed)
            if gone:  # it would silently run as the base model
                raise AdapterGoneError(f"adapter id {request.adapter_id} is not loaded")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            if request.adapter_id is not None:
                self._users[request.adapter_id] += 1
            self._waiting.append(request)
            self._lock.notify_all()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run fn on the engine thread between decode steps; the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if not self.alive:
                raise EngineStoppedError("the engine is not running")
            self._commands.append((fn, future))
            self._lock.notify_all()
        return future

    def install_adapter(self, adapter_id: int, adapter: PreparedAdapter) -> concurrent.futures.Future:
        return self.call(lambda: self._install(adapter_id, adapter))

    def remove_adapter(self, adapter_id: int) -> concurrent.futures.Future:
        """Remove an adapter's weights now, or once the requests already using it finish."""
        return self.call(lambda: self._remove(adapter_id))

    # ----- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.num_threads:
            # Set from this thread: with OpenMP the setting belongs to the calling thread. On a busy
            # CPU, more intra-op threads than free cores make every small decode matmul wait on
            # spinning workers (30x slower measured on 2 shared cores).
            torch.set_num_threads(self.num_threads)
        while True:
            with self._lock:
                while not (self._stop or self._waiting or self._commands or self._rows):
                    self._lock.wait()
                if self._stop:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for fn, future in commands:
                if not future.set_running_or_notify_cancel():
                    continue  # its caller stopped waiting; set_result would raise on this thread
                try:
                    future.set_result(fn())
                except Exception as exc:  # reported to the caller, never fatal to the loop
                    future.set_exception(exc)
            try:
                self._drop_cancelled()
                self._admit()
                if self._rows:
                    self._decode_step()
            except Exception as exc:  # a bug must not stop the engine: fail the batch, keep serving
                log.exception("engine step failed; failing the %d running requests", len(self._rows))
                self._fail_running(exc)
        for row in self._rows:
            self._emit(row.request, "error", "the server is shutting down")
        for request in self._waiting:
            self._emit(request, "error", "the server is shutting down")
        with self._lock:  # commands that came in behind the stop: their callers must not wait forever
            left, self._commands = list(self._commands), collections.deque()
        for _, future in left:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineStoppedError("the engine stopped before it ran this"))

    def _install(self, adapter_id: int, adapter: PreparedAdapter) -> None:
        for module_name, w in adapter.layers.items():
            on_device = RowAdapterWeights(w.lora_A.to(self.device), w.lora_B.to(self.device), w.scaling)
            ensure_row_lora(self.model, module_name).add_adapter(adapter_id, on_device)
        with self._lock:
            self._installed.add(adapter_id)
        self._planned = None

    def _remove(self, adapter_id: int) -> None:
        with self._lock:
            if self._users[adapter_id] > 0:
                self._doomed.add(adapter_id)
                return
            self._installed.discard(adapter_id)
            self._doomed.discard(adapter_id)
        for module in self.model.modules():
            if isinstance(module, RowLoraLinear):
                module.remove_adapter(adapter_id)
        self._planned = None

    def _release(self, request: GenerationRequest) -> None:
        if request.released:
            return
        request.released = True
        adapter_id = request.adapter_id
        if adapter_id is None:
            return
        with self._lock:
            self._users[adapter_id] -= 1
            unused = self._users[adapter_id] <= 0
            if unused:
                del self._users[adapter_id]
            doomed = unused and adapter_id in self._doomed
        if doomed:
            self._remove(adapter_id)

    def _emit(self, request: GenerationRequest, kind: str, value: object) -> None:
        try:
            request.sink(kind, value)
        except Exception:  # the client's loop is gone: treat as a disconnect
            request.cancelled = True

    def _drop_cancelled(self) -> None:
        with self._lock:
            dropped = [r for r in self._waiting if r.cancelled]
            if dropped:
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        for request in dropped:
            self._release(request)
        self._finish_rows([i for i, row in enumerate(self._rows) if row.request.cancelled])

    def _finish_rows(self, finished: list[int]) -> None:
        if not finished:
            return
        gone = set(finished)
        for i in finished:
            self._release(self._rows[i].request)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        self._batch.keep_rows(keep)

    def _fail_running(self, exc: Exception) -> None:
        rows, self._rows, self._batch, self._planned = self._rows, [], BatchCache(), None
        for row in rows:
            self._release(row.request)
            self._fail_row(row.request, exc)

    def _admit(self) -> None:
        """Prefill waiting requests (together, up to the free slots and a token budget) into the batch."""
        admitted: list[GenerationRequest] = []
        with self._lock:
            while self._waiting and len(self._rows) + len(admitted) < self.max_batch_size:
                request = self._waiting[0]
                longest = max([len(request.prompt_ids)] + [len(r.prompt_ids) for r in admitted])
                if admitted and longest * (len(admitted) + 1) > self.prefill_token_budget:
                    break
                admitted.append(self._waiting.popleft())
        for request in [r for r in admitted if r.cancelled]:
            self._release(request)
        admitted = [r for r in admitted if not r.cancelled]
        if not admitted:
            return
        try:
            self._prefill(admitted)
        except Exception as exc:
            log.exception("prefill failed for %d requests", len(admitted))
            for request in admitted:
                if not request.released:  # those already finished got their events
                    self._fail_row(request, exc)
                    self._release(request)

    def _plan(self, adapter_ids: tuple) -> set[int]:
        """Plan the batch's rows; return the rows that cannot run (their adapter's weights are bad)."""
        if adapter_ids == self._planned:
            return set()
        failed = set_rows(self.model, adapter_ids)
        self._planned = None if failed else adapter_ids
        for adapter_id in sorted({adapter_ids[i] for i in failed}):
            log.error("adapter id %s cannot be applied (weights or scaling out of range for the model's "
                      "dtype); failing its requests only", adapter_id)
        return failed

    def _fail_row(self, request: GenerationRequest, exc: BaseException | str) -> None:
        """Fail one request: the details go to the log under its request id, the client gets the id."""
        if isinstance(exc, str):
            message = exc
        else:
            request.error_detail = f"{type(exc).__name__}: {exc}"
            log.error("request %s failed: %s", request.request_id, request.error_detail)
            message = f"generation failed: internal error (request id {request.request_id})"
        self._emit(request, "error", message)

    def _forward(self, **kwargs) -> tuple[Tensor, object]:
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(use_cache=True, **kwargs)
        return out.logits[:, -1, :].float().cpu(), out.cache  # (N, V), sampled on the CPU

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        lengths = [len(r.prompt_ids) for r in requests]
        longest = max(lengths)
        # (N, T), right-padded
        ids = torch.zeros(len(requests), longest, dtype=torch.long, device=self.device)
        for i, r in enumerate(requests):
            ids[i, : lengths[i]] = torch.tensor(r.prompt_ids, device=self.device)
        unplanned = self._plan(tuple(r.adapter_id for r in requests))
        last = sorted(set(lengths))
        # Causal attention only: a real token never attends to the padding on its right.
        out = self.model(input_ids=ids, use_cache=True,
                         **({"logits_to_keep": torch.tensor([n - 1 for n in last], device=self.device)}
                            if self._keep_logits else {}))
        column = {n: (last.index(n) if self._keep_logits else n - 1) for n in last}
        # (N, V)
        logits = torch.stack([out.logits[i, column[n]] for i, n in enumerate(lengths)]).float().cpu()
        check_cache(out.cache)
        finite = finite_rows(logits)
        accepted = []
        for i, request in enumerate(requests):
            generator = None
            if not request.params.greedy:
                generator = torch.Generator()
                if request.params.seed is None:
                    generator.seed()  # a fresh seed for this request only; the global RNG is left alone
                else:
                    generator.manual_seed(request.params.seed)
            row = _Row(request, last_token=-1, position=lengths[i] - 1, generated=0, generator=generator)
            if i in unplanned:
                self._fail_row(request, _UNUSABLE_ADAPTER)
                self._release(request)
            elif self._accept(row, logits[i], finite[i]):
                accepted.append((i, row))
            else:
                self._release(request)
        if accepted:
            self._batch.add_rows(out.cache, [(i, lengths[i]) for i, _ in accepted])
            self._rows.extend(row for _, row in accepted)

    def _decode_step(self) -> None:
        rows = self._rows
        unplanned = self._plan(tuple(r.request.adapter_id for r in rows))
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=self.device)      # (N, 1)
        positions = torch.tensor([[r.position] for r in rows], dtype=torch.long, device=self.device)  # (N, 1)
        logits, _ = self._forward(input_ids=ids, position_ids=positions,
                                  attention_mask=self._batch.step_mask(), cache=self._batch.cache)
        self.decode_steps += 1
        self.decoded_tokens += len(rows)
        finite = finite_rows(logits)
        for i in unplanned:
            self._fail_row(rows[i].request, _UNUSABLE_ADAPTER)
        finished = [i for i, row in enumerate(rows)
                    if i in unplanned or not self._accept(row, logits[i], finite[i])]
        self._finish_rows(finished)

    def _accept(self, row: _Row, logits: Tensor, finite: bool) -> bool:
        """Sample the row's next token and emit it; return False when the row is finished.

        A row whose logits are not finite (an adapter that overflows) fails alone, with an error
        event; the other rows of the batch go on.
        """
        request = row.request
        if not finite:
            name = "the base model" if request.adapter_id is None else "its adapter"
            self._emit(request, "error", f"generation failed: {name} produced non-finite logits (NaN or inf)")
            return False
        token = sample(logits, request.params, row.generator)
        row.last_token, row.position, row.generated = token, row.position + 1, row.generated + 1
        self._emit(request, "token", token)
        if token in self.eos_token_ids:
            reason = "stop"
        elif row.generated >= request.params.max_tokens or row.position + 1 >= self.context_length:
            reason = "length"
        else:
            return not request.cancelled
        self._emit(request, "finish", reason)
        return False


_UNUSABLE_ADAPTER = ("generation failed: its adapter's weights or scaling are out of range for the "
                     "served dtype")


def wait_until_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Return True once the engine has no waiting or running requests (used by tests and benches)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.queue_depth == 0 and engine.running == 0:
            return True
        time.sleep(0.01)
    return False
