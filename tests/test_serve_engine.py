"""The engine: mixed-adapter continuous batches give exactly the greedy tokens of single runs."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from factories import tiny_batch, tiny_model
from loratune import LoraConfig, LoraModel, get_peft_model
from loratune.serve.engine import Engine, GenerationRequest, wait_until_idle
from loratune.serve.lora_rows import RowLoraLinear, linear_shapes
from loratune.serve.registry import prepare_adapter
from loratune.serve.sampling import SamplingParams, sample

EOS = 2
TARGETS = {"llama": {"a1": (["q_proj", "v_proj"], 4), "a2": (["q_proj", "o_proj", "down_proj"], 8)},
           "gpt2": {"a1": (["c_attn"], 4), "a2": (["c_attn", "c_fc"], 8)}}


def save_adapters(base, arch: str, tmp_path) -> dict[str, str]:
    """Save two random adapters (different ranks and targets) with the core library."""
    paths = {}
    for seed, (name, (targets, r)) in enumerate(TARGETS[arch].items(), start=10):
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        get_peft_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path / name))
        paths[name] = str(tmp_path / name)
    return paths


def reference_tokens(base, path: str | None, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of a plain single-adapter generate (the loratune core model)."""
    model = copy.deepcopy(base)
    if path is not None:
        model = LoraModel.from_pretrained(model, path).eval()
    ids = torch.tensor([prompt], device=next(base.parameters()).device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, eos_token_id=EOS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def start_engine(base, paths: dict[str, str], **kwargs) -> tuple[Engine, dict[str, int]]:
    engine = Engine(copy.deepcopy(base), eos_token_ids={EOS}, context_length=128, num_threads=1, **kwargs)
    engine.start()
    shapes = linear_shapes(engine.model)
    ids = {}
    for adapter_id, (name, path) in enumerate(paths.items(), start=1):
        prepared = prepare_adapter(name, path_of(path), shapes, torch.float32)
        engine.install_adapter(adapter_id, prepared).result()
        ids[name] = adapter_id
    return engine, ids


def path_of(path: str):
    from pathlib import Path

    return Path(path)


class Collector:
    """A request's sink: gathers tokens; `on_token(n)` hooks let a test act mid-generation."""

    def __init__(self):
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.done = threading.Event()
        self.hooks: dict[int, callable] = {}

    def __call__(self, kind, value):
        if kind == "token":
            self.tokens.append(value)
            if len(self.tokens) in self.hooks:
                self.hooks.pop(len(self.tokens))()
        else:
            self.finish = value
            self.done.set()


def request(prompt, adapter_id, max_tokens, **params):
    sink = Collector()
    params.setdefault("temperature", 0)
    sampling = SamplingParams(max_tokens=max_tokens, **params)
    return GenerationRequest(list(prompt), adapter_id, sampling, sink), sink


@pytest.mark.parametrize("arch, device", [("llama", "cpu"), ("gpt2", "cpu"),
                                          pytest.param("llama", "cuda", marks=pytest.mark.gpu)])
def test_mixed_continuous_batch_equals_single_adapter_runs(arch, device, tmp_path):
    base = tiny_model(arch, seed=0).to(device)
    paths = save_adapters(base, arch, tmp_path)
    engine, ids = start_engine(base, paths, max_batch_size=4)
    prompts = [tiny_batch(1, n, seed=n)[0].tolist() for n in (3, 7, 5, 9, 4, 6)]
    plan = [(None, 10), ("a1", 14), ("a2", 6), ("a1", 12), (None, 8), ("a2", 15)]
    try:
        reqs = [request(p, ids.get(name), n) for p, (name, n) in zip(prompts, plan)]
        # three start together; the rest join mid-decode (after token 3 of the first) and queue for slots
        reqs[0][1].hooks[3] = lambda: [engine.submit(r) for r, _ in reqs[3:]]
        gate = threading.Event()
        engine.call(gate.wait)  # hold the engine so the first three are prefilled together, right-padded
        for r, _ in reqs[:3]:
            engine.submit(r)
        gate.set()
        assert all(sink.done.wait(30) for _, sink in reqs)
        assert wait_until_idle(engine)
    finally:
        engine.stop()
    for (_, sink), prompt, (name, n) in zip(reqs, prompts, plan):
        expected = reference_tokens(base, paths.get(name), prompt, n)
        assert sink.tokens == expected, (name, sink.tokens, expected)
        assert sink.finish == ("stop" if expected[-1] == EOS else "length")
    # not vacuous: each adapter changes the tokens of the same prompt
    outputs = {name: reference_tokens(base, paths.get(name), prompts[1], 14) for name in (None, "a1", "a2")}
    assert len({tuple(v) for v in outputs.values()}) == 3


def test_unload_waits_for_requests_in_flight(tmp_path):
    base = tiny_model("llama", seed=0)
    paths = save_adapters(base, "llama", tmp_path)
    engine, ids = start_engine(base, paths)
    prompt = tiny_batch(1, 5, seed=3)[0].tolist()
    try:
        (req, sink) = request(prompt, ids["a1"], 20)
        removed = []
        sink.hooks[2] = lambda: removed.append(engine.remove_adapter(ids["a1"]))
        engine.submit(req)
        assert sink.done.wait(30)
        removed[0].result(10)
        assert wait_until_idle(engine)
        engine.call(lambda: None).result(10)
        layers = [m for m in engine.model.modules() if isinstance(m, RowLoraLinear)]
        assert layers and all(ids["a1"] not in m.adapters for m in layers)
        assert any(ids["a2"] in m.adapters for m in layers)
    finally:
        engine.stop()
    assert sink.tokens == reference_tokens(base, paths["a1"], prompt, 20)


def test_seeded_sampling_repeats_and_cancel_frees_the_slot(tmp_path):
    base = tiny_model("llama", seed=0)
    engine, _ = start_engine(base, {})
    prompt = [5, 6, 7]
    try:
        runs = []
        for _ in range(2):
            req, sink = request(prompt, None, 12, temperature=0.9, top_p=0.8, seed=3)
            engine.submit(req)
            assert sink.done.wait(30)
            runs.append(sink.tokens)
        assert runs[0] == runs[1]
        req, sink = request(prompt, None, 100, temperature=0)
        sink.hooks[2] = lambda: setattr(req, "cancelled", True)
        engine.submit(req)
        assert wait_until_idle(engine)
        assert len(sink.tokens) <= 3 and sink.finish is None
    finally:
        engine.stop()


def test_a_model_with_a_sliding_window_cache_is_refused_at_startup():
    from transformers import AutoModelForCausalLM, Qwen2Config

    from loratune.errors import UnsupportedFeatureError
    from loratune.serve.server import build_server
    from loratune.serve.state import ServeSettings

    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=4, max_window_layers=0)
    model = AutoModelForCausalLM.from_config(config).eval()

    class Tokenizer:
        bos_token_id, eos_token_id = 1, 2

    with pytest.raises(UnsupportedFeatureError, match="DynamicSlidingWindowLayer"):
        build_server(model, Tokenizer(), ServeSettings(base_name="x"), num_threads=1)


def test_quantized_base_serves_adapters_like_the_core_model(tmp_path):
    from loratune.quant import quantize_model

    plain = tiny_model("llama", seed=0)
    paths = save_adapters(plain, "llama", tmp_path)
    base = quantize_model(copy.deepcopy(plain), bits=4, compute_dtype=torch.float32)
    assert any(getattr(m, "is_quantized", False) for m in base.modules())
    engine, ids = start_engine(base, paths, max_batch_size=4)
    prompt = tiny_batch(1, 6, seed=4)[0].tolist()
    try:
        reqs = [request(prompt, ids.get(name), 10) for name in (None, "a1", "a2")]
        for r, _ in reqs:
            engine.submit(r)
        assert all(sink.done.wait(30) for _, sink in reqs)
    finally:
        engine.stop()
    for (_, sink), name in zip(reqs, (None, "a1", "a2")):
        assert sink.tokens == reference_tokens(base, paths.get(name), prompt, 10), name


def test_a_failed_prefill_releases_each_request_once_and_spares_finished_ones(tmp_path, monkeypatch):
    base = tiny_model("llama", seed=0)
    paths = save_adapters(base, "llama", tmp_path)
    engine, ids = start_engine(base, paths)
    prompt = tiny_batch(1, 5, seed=3)[0].tolist()
    try:
        done_req, done_sink = request(prompt, ids["a1"], 1)
        bad_req, bad_sink = request(prompt, ids["a1"], 5)
        real_accept = engine._accept
        seen = []

        def accept_then_fail(row, logits, finite=True):  # the first row finishes; the second row's step fails
            seen.append(row)
            if len(seen) == 2:
                raise RuntimeError("boom")
            return real_accept(row, logits, finite)

        monkeypatch.setattr(engine, "_accept", accept_then_fail)
        engine.call(lambda: (engine._waiting.extend([done_req, bad_req]),
                             engine._users.__setitem__(ids["a1"], engine._users[ids["a1"]] + 2))).result(10)
        assert done_sink.done.wait(30) and bad_sink.done.wait(30)
        assert done_sink.finish == "length" and done_sink.tokens  # no error event after it finished
        assert bad_sink.finish != "length"
        engine.call(lambda: None).result(10)
        assert engine._users.get(ids["a1"], 0) == 0  # released exactly once each, not three times
    finally:
        engine.stop()


def test_a_command_queued_behind_a_stop_fails_instead_of_hanging():
    from loratune.serve.engine import EngineStoppedError

    engine = Engine(tiny_model("llama", seed=0), eos_token_ids={EOS}, context_length=128, num_threads=1)
    engine.start()
    running, release = threading.Event(), threading.Event()
    first = engine.call(lambda: (running.set(), release.wait(60)))
    assert running.wait(60)
    second = engine.call(lambda: "ran")  # queued while the engine thread is busy with the first
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    while not engine._stop:  # the stop is asked for before the first command ends
        time.sleep(0.001)
    release.set()
    stopper.join()
    assert first.result(60)[1] is True
    with pytest.raises(EngineStoppedError, match="stopped before it ran"):
        second.result(60)


def test_a_request_for_an_adapter_the_engine_does_not_hold_is_refused(tmp_path):
    """Not run as the base model: an id never installed, or one removed, is an AdapterGoneError."""
    from loratune.serve.engine import AdapterGoneError

    base = tiny_model("llama", seed=0)
    engine, ids = start_engine(base, save_adapters(base, "llama", tmp_path))
    prompt = tiny_batch(1, 5, seed=3)[0].tolist()
    try:
        with pytest.raises(AdapterGoneError):
            engine.submit(request(prompt, 99, 2)[0])
        engine.remove_adapter(ids["a1"]).result(60)
        with pytest.raises(AdapterGoneError):
            engine.submit(request(prompt, ids["a1"], 2)[0])
        req, sink = request(prompt, ids["a2"], 2)
        engine.submit(req)
        assert sink.done.wait(60) and sink.finish == "length"
    finally:
        engine.stop()


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46])
def test_a_top_p_below_float32s_range_samples_the_top_token(top_p):
    # Compared with float32 probabilities such a top_p is 0: no token was kept, multinomial raised,
    # and the engine failed every request of the batch.
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_p=top_p, seed=1)
    assert sample(logits, params, torch.Generator().manual_seed(1)) == int(logits.argmax())
