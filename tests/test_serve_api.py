"""The HTTP server end to end: a real uvicorn on 127.0.0.1 driven by the official `openai` client."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from safetensors.torch import load_file, save_file

from loratune.serve.lora_rows import linear_shapes
from loratune.serve.server import build_server
from loratune.serve.state import ServeSettings
from loratune.tools.loading import load_base_model, load_tokenizer

KEY = "test-key"
BASE = "tiny-base"


def write_adapter(path: Path, model, *, r: int, targets: list[str], seed: int, scale: float = 0.1,
                  lora_alpha: float = 16) -> Path:
    """Write a PEFT-format adapter with random A and B for the given target suffixes."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (in_f, out_f) in linear_shapes(model).items():
        if name.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * scale
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * scale
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": targets,
              "task_type": "CAUSAL_LM", "base_model_name_or_path": "preset:tiny-llama"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


class LiveServer:
    """A real uvicorn server on a free loopback port, running in a thread."""

    def __init__(self, app, state, **config):
        self.app, self.state = app, state
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_graceful_shutdown=2,
                                                    **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def client(self, key: str | None = KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, **kwargs)

    def post(self, path: str, payload=None, *, key: str | None = KEY, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, json=payload, headers=headers, **{"timeout": 30, **kwargs})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.state.engine.stop()


def start_server(tmp: Path, **kwargs) -> LiveServer:
    """Serve preset:tiny-llama with adapters a1 (r=4) and a2 (r=8) loaded; tmp/root is the adapter root."""
    model = load_base_model("preset:tiny-llama", dtype="float32")
    tokenizer = load_tokenizer("preset:tiny-llama")
    root = tmp / "root"
    write_adapter(root / "a1", model, r=4, targets=["q_proj", "v_proj"], seed=1)
    write_adapter(root / "a2", model, r=8, targets=["q_proj", "o_proj", "down_proj"], seed=2)
    write_adapter(root / "a3", model, r=2, targets=["up_proj"], seed=3)
    settings = ServeSettings(base_name=BASE, base_root="preset:tiny-llama", api_keys=[KEY],
                             adapter_roots=[root], max_request_tokens=kwargs.pop("max_request_tokens", 512),
                             max_body_bytes=kwargs.pop("max_body_bytes", 64 * 1024))
    app, state = build_server(model, tokenizer, settings,
                              adapters={"a1": str(root / "a1"), "a2": str(root / "a2")},
                              num_threads=1, **kwargs)
    return LiveServer(app, state)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("serve"))
    yield server
    server.stop()


def complete(client, model, prompt="The capital of France is", max_tokens=12, **kwargs):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     **kwargs)


def expect_error(status: int, fn, *args, **kwargs) -> dict:
    """Call fn, assert it fails with an openai APIStatusError of `status`, return the error body."""
    with pytest.raises(openai.APIStatusError) as info:
        fn(*args, **kwargs)
    assert info.value.status_code == status, info.value
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}, body
    return body


# ----- listing, completions, chat ---------------------------------------------------------------

def test_models_lists_base_and_adapters_in_vllm_shape(live):
    cards = {m.id: m.model_dump() for m in live.client().models.list().data}
    assert set(cards) == {BASE, "a1", "a2"}
    assert cards[BASE]["parent"] is None and cards[BASE]["root"] == "preset:tiny-llama"
    assert cards[BASE]["max_model_len"] == 1024
    for name in ("a1", "a2"):
        assert cards[name]["parent"] == BASE
        assert cards[name]["root"].endswith(f"/root/{name}")
        assert cards[name]["object"] == "model" and cards[name]["permission"]


def test_completions_for_base_and_two_adapters(live):
    client = live.client()
    texts = {}
    for model in (BASE, "a1", "a2"):
        r = complete(client, model)
        assert r.model == model and r.object == "text_completion"
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(live.state.tokenizer("The capital of France is")["input_ids"])
        texts[model] = r.choices[0].text
        assert complete(client, model).choices[0].text == texts[model]  # greedy is deterministic
    assert len(set(texts.values())) == 3, texts  # each adapter changes the output


@pytest.mark.parametrize("model", [BASE, "a2"])
def test_greedy_text_equals_loratune_generate_for_the_same_adapter_alone(live, model):
    from loratune import LoraModel
    from loratune.tools.generation import GenerationSettings, chat_ids, generate_text, prompt_ids

    tokenizer = live.state.tokenizer
    alone = load_base_model("preset:tiny-llama", dtype="float32")
    if model != BASE:
        alone = LoraModel.from_pretrained(alone, str(live.state.settings.adapter_roots[0] / model)).eval()
    settings = GenerationSettings(max_new_tokens=10)
    r = complete(live.client(), model, prompt="Hello world", max_tokens=10)
    assert r.choices[0].text == generate_text(alone, tokenizer, prompt_ids(tokenizer, "Hello world"),
                                              settings)
    messages = [{"role": "user", "content": "Say something"}]
    r = live.client().chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == generate_text(alone, tokenizer, chat_ids(tokenizer, messages),
                                                         settings)


def test_concurrent_mixed_requests_equal_sequential_ones(live):
    from concurrent.futures import ThreadPoolExecutor

    client = live.client()
    jobs = [(model, f"Prompt number {i}") for i in range(3) for model in (BASE, "a1", "a2")]
    sequential = [complete(client, m, prompt=p).choices[0].text for m, p in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(lambda job: complete(client, job[0], prompt=job[1]).choices[0].text, jobs))
    assert concurrent == sequential


def test_chat_for_base_and_adapters(live):
    client = live.client()
    contents = set()
    for model in (BASE, "a1", "a2"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi there"}],
                                           max_tokens=8, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason in ("stop", "length")
        contents.add(r.choices[0].message.content)
        template = live.state.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                                            add_generation_prompt=True, tokenize=False)
        template_ids = live.state.tokenizer(template, add_special_tokens=False)["input_ids"]
        assert r.usage.prompt_tokens == len(template_ids)
    assert len(contents) == 3


def test_streaming_completion_and_chat_equal_non_streaming(live):
    client = live.client()
    full = complete(client, "a1").choices[0].text
    chunks = list(complete(client, "a1", stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    messages = [{"role": "user", "content": "Tell me"}]
    chat = client.chat.completions.create(model="a2", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="a2", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == chat.choices[0].message.content


def test_stream_ends_with_done(live):
    payload = {"model": BASE, "prompt": "abc", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=payload, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stop_strings_and_seeded_sampling(live):
    client = live.client()
    full = complete(client, BASE, max_tokens=16).choices[0].text
    stop = full[5:8]
    r = complete(client, BASE, max_tokens=16, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[: full.index(stop)]
    sampled = [client.completions.create(model="a1", prompt="x", max_tokens=10, temperature=1.0, seed=7)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


# ----- runtime adapters ---------------------------------------------------------------------------

def test_load_and_unload_adapter_at_runtime_vllm_payloads(live):
    client = live.client()
    path = str(live.state.settings.adapter_roots[0] / "a3")
    before = complete(client, BASE).choices[0].text
    r = live.post("/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": path})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a3' added successfully."
    assert "a3" in {m.id for m in client.models.list().data}
    assert complete(client, "a3").choices[0].text != before
    again = live.post("/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": path})
    assert again.status_code == 400
    assert again.json()["error"]["message"] == "The lora adapter 'a3' has already been loaded."
    r = live.post("/v1/unload_lora_adapter", {"lora_name": "a3"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a3' removed successfully."
    assert "a3" not in {m.id for m in client.models.list().data}
    expect_error(404, complete, client, "a3")
    gone = live.post("/v1/unload_lora_adapter", {"lora_name": "a3"})
    assert gone.status_code == 404
    assert gone.json()["error"]["message"] == "The lora adapter 'a3' cannot be found."
    assert live.post("/v1/load_lora_adapter", {"lora_name": "a3"}).status_code == 400
    assert live.post("/v1/unload_lora_adapter", {}).status_code == 400
    # a relative path resolves under the adapter root
    assert live.post("/v1/load_lora_adapter", {"lora_name": "a3b", "lora_path": "a3"}).status_code == 200
    assert complete(client, "a3b").choices[0].text != before
    assert live.post("/v1/unload_lora_adapter", {"lora_name": "a3b"}).status_code == 200


def test_load_and_unload_while_requests_are_in_flight(live):
    client = live.client()
    expected = complete(client, "a2", max_tokens=40).choices[0].text
    path = str(live.state.settings.adapter_roots[0] / "a3")
    stream = complete(client, "a2", max_tokens=40, stream=True)
    first = next(iter(stream)).choices[0].text
    assert live.post("/v1/load_lora_adapter", {"lora_name": "a3c", "lora_path": path}).status_code == 200
    assert live.post("/v1/unload_lora_adapter", {"lora_name": "a3c"}).status_code == 200
    rest = "".join(c.choices[0].text for c in stream if c.choices)
    assert first + rest == expected


# ----- errors ---------------------------------------------------------------------------------------

def test_auth_errors_and_open_health(live):
    body = expect_error(401, live.client(key="wrong").models.list)
    assert body["type"] == "authentication_error"
    assert httpx.get(f"{live.url}/v1/models").status_code == 401
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert httpx.head(f"{live.url}/health").status_code == 200  # uptime monitors probe with HEAD


def test_unknown_model_404(live):
    body = expect_error(404, complete, live.client(), "no-such-adapter")
    assert "no-such-adapter" in body["message"] and body["param"] == "model"


def test_malformed_json_and_schema_errors_400(live):
    r = httpx.post(f"{live.url}/v1/completions", content=b"{not json", timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = live.post("/v1/completions", {"model": BASE})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    body = expect_error(400, complete, live.client(), BASE, max_tokens=0)
    assert body["param"] == "max_tokens"
    expect_error(400, live.client().completions.create, model=BASE, prompt="x", n=2)
    body = expect_error(400, live.client().completions.create, model=BASE, prompt="x", logprobs=2)
    assert body["param"] == "logprobs"
    body = expect_error(400, live.client().completions.create, model=BASE, prompt="x", presence_penalty=0.5)
    assert body["param"] == "presence_penalty"
    assert live.client().completions.create(model=BASE, prompt="x", max_tokens=1, presence_penalty=0,
                                            echo=False)
    expect_error(400, live.client().chat.completions.create, model=BASE, messages=[])
    body = expect_error(400, live.client().completions.create, model=BASE, prompt="x", temperature=1.0,
                        seed=2**64)
    # before: accepted, then the engine failed the whole prefill batch with a 500
    assert body["param"] == "seed"


def test_token_limits_400_and_413(live):
    body = expect_error(400, complete, live.client(), BASE, max_tokens=5000)
    assert body["code"] == "context_length_exceeded"
    body = expect_error(413, complete, live.client(), BASE, max_tokens=600)  # over --max-request-tokens 512
    assert body["code"] == "request_too_large"
    r = live.post("/v1/completions", {"model": BASE, "prompt": "x" * 100_000, "max_tokens": 1})
    assert r.status_code == 413 and "error" in r.json()

    def chunked(size):  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "' + BASE.encode() + b'", "max_tokens": 2, "prompt": "'
        yield b"x" * size
        yield b'"}'

    for size, status in ((100_000, 413), (10, 200)):
        r = httpx.post(f"{live.url}/v1/completions", content=chunked(size), timeout=30,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert r.status_code == status, r.text


def test_bad_adapter_names_and_paths_400(live):
    root = live.state.settings.adapter_roots[0]
    for name in ("bad name", "../a1", "a/b", "x" * 200, BASE):
        r = live.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(root / "a3")})
        assert r.status_code == 400, name
        assert r.json()["error"]["param"] == "lora_name"
    for path in ("/etc", str(root / ".." / "root2"), "../../etc", str(root) + "/../"):
        r = live.post("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path})
        assert r.status_code == 400 and "outside the adapter roots" in r.json()["error"]["message"], path
    r = live.post("/v1/load_lora_adapter", {"lora_name": "ghost", "lora_path": str(root / "missing")})
    assert r.status_code == 404 and "No adapter found" in r.json()["error"]["message"]


def test_corrupt_adapters_fail_their_load_and_the_server_keeps_serving(live):
    root = live.state.settings.adapter_roots[0]
    client = live.client()
    before = complete(client, "a1").choices[0].text
    truncated = write_adapter(root / "truncated", live.state.engine.model, r=4, targets=["q_proj"], seed=5)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    misshapen = write_adapter(root / "misshapen", live.state.engine.model, r=4, targets=["q_proj"], seed=5)
    (misshapen / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "target_modules": ["q_proj", "k_proj"]}))
    binary = root / "binary"
    binary.mkdir()
    (binary / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                            "target_modules": ["q_proj"]}))
    (binary / "adapter_model.bin").write_bytes(b"pickle")
    dora = write_adapter(root / "dora", live.state.engine.model, r=4, targets=["q_proj"], seed=5)
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True,
                                                         "target_modules": ["q_proj"]}))
    scalar = write_adapter(root / "scalar", live.state.engine.model, r=4, targets=["q_proj"], seed=5)
    tensors = load_file(str(scalar / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    tensors[key] = torch.tensor(1.0)  # a 0-d tensor: before, an IndexError and a 500
    save_file(tensors, str(scalar / "adapter_model.safetensors"))
    expected = {"truncated": "not a readable safetensors file",
                "misshapen": "k_proj.lora_A.weight is missing",
                "binary": "only safetensors", "dora": "use_dora",
                "scalar": "has shape (), expected (4, 256) (adapter_config.json gives this layer r=4)"}
    for name, needle in expected.items():
        r = live.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(root / name)})
        assert r.status_code == 400, (name, r.text)
        assert needle in r.json()["error"]["message"], (name, r.text)
    assert {m.id for m in client.models.list().data} == {BASE, "a1", "a2"}
    assert complete(client, "a1").choices[0].text == before


def test_disconnecting_stream_frees_its_slot(live, monkeypatch):
    engine = live.state.engine
    monkeypatch.setattr(engine, "eos_token_ids", set())  # so only the disconnect can end it early
    payload = {"model": "a1", "prompt": "abc", "max_tokens": 500, "temperature": 0, "stream": True}
    before = engine.decoded_tokens
    with httpx.stream("POST", f"{live.url}/v1/completions", json=payload, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 5
        while engine.running != 1 and time.monotonic() < deadline:  # the row joins after its first token
            time.sleep(0.005)
        assert engine.running == 1
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and engine.queue_depth == 0
    assert engine.decoded_tokens - before < 499  # stopped well before max_tokens


def test_metrics_report_requests_ttft_queue_and_adapters(live):
    complete(live.client(), "a1", max_tokens=2)
    text = httpx.get(f"{live.url}/metrics").text
    assert 'loratune_requests_total{endpoint="completions",model="a1",status="200"}' in text
    assert 'loratune_time_to_first_token_seconds_count{model="a1"}' in text
    assert "loratune_queue_depth 0.0" in text and "loratune_loaded_adapters 2.0" in text


def hold_decoding(engine, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make the engine's decode steps wait for `release`; `decoding` is set once one is waiting.

    With max_batch_size=1 a first request is then running and stays running, so a second one
    waits in the queue however fast or slow the machine is.
    """
    decoding, release = threading.Event(), threading.Event()
    step = engine._decode_step

    def held():
        decoding.set()
        release.wait(30)
        step()

    monkeypatch.setattr(engine, "_decode_step", held)
    return decoding, release


def fill_the_queue(server, monkeypatch) -> tuple[list, threading.Event]:
    """One request running (held in its decode step), one waiting: the queue (max_queue=1) is full."""
    engine = server.state.engine
    decoding, release = hold_decoding(engine, monkeypatch)
    client = server.client()
    first = complete(client, "a1", max_tokens=500, stream=True)
    assert decoding.wait(30) and engine.running == 1
    second = complete(client, "a1", max_tokens=500, stream=True)
    assert engine.queue_depth == 1  # submitted before the handler returned
    return [first, second], release


def test_full_queue_429_and_stopped_engine_503(tmp_path, monkeypatch):
    server = start_server(tmp_path, max_batch_size=1, max_queue=1)
    try:
        client = server.client()
        streams, release = fill_the_queue(server, monkeypatch)
        body = expect_error(429, complete, client, BASE)
        assert body["type"] == "rate_limit_error"
        release.set()
        for s in streams:
            s.close()
        server.state.engine.stop()
        expect_error(503, complete, client, BASE)
        assert httpx.get(f"{server.url}/health").status_code == 503
    finally:
        server.stop()


def test_a_failing_step_fails_its_requests_and_the_server_keeps_serving(live, monkeypatch, caplog):
    engine = live.state.engine
    forward = engine._forward
    calls = {"n": 0}

    def flaky(**kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step of the request below
            raise RuntimeError("injected failure")
        return forward(**kwargs)

    monkeypatch.setattr(engine, "_forward", flaky)
    body = expect_error(500, complete, live.client(), "a1")
    # the client gets a request id; the exception itself goes to the log only
    assert "internal error (request id" in body["message"] and body["type"] == "server_error"
    assert "injected failure" not in body["message"]
    assert "injected failure" in caplog.text
    assert engine.alive and engine.running == 0
    assert complete(live.client(), "a1").choices[0].finish_reason == "length"


def test_chat_prompt_errors_are_400s_naming_messages():
    from types import SimpleNamespace

    from loratune.serve import api
    from loratune.serve.protocol import ChatMessage
    from loratune.serve.registry import RequestError

    class Tok:
        chat_template = None

    with pytest.raises(RequestError) as err:
        api._chat_prompt(SimpleNamespace(tokenizer=Tok()), [ChatMessage(role="user", content="hi")])
    assert err.value.status == 400 and err.value.param == "messages" and "no chat template" in str(err.value)

    class Refusing(Tok):
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, *a, **k):
            raise ValueError("roles must alternate")

    with pytest.raises(RequestError) as err:
        api._chat_prompt(SimpleNamespace(tokenizer=Refusing()), [ChatMessage(role="user", content="hi")])
    assert err.value.param == "messages" and "roles must alternate" in str(err.value)


def test_unload_refused_by_a_stopped_engine_keeps_the_adapter_listed(live, monkeypatch):
    from loratune.serve.engine import EngineStoppedError

    def stopped(adapter_id):
        raise EngineStoppedError("the engine has stopped")

    monkeypatch.setattr(live.state.engine, "remove_adapter", stopped)
    r = live.post("/v1/unload_lora_adapter", {"lora_name": "a1"})
    assert r.status_code == 503
    # before: gone from the list, still loaded
    assert "a1" in {m.id for m in live.client().models.list().data}


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
def test_an_adapter_command_the_engine_stops_before_running_is_a_503(live, monkeypatch, path):
    """Taken by the engine, then failed by its stop (not refused up front): a 503, the list as before."""
    import concurrent.futures

    from loratune.serve.engine import EngineStoppedError

    def stopped_before_running(*args):
        future = concurrent.futures.Future()
        future.set_exception(EngineStoppedError("the engine stopped before it ran this"))
        return future

    monkeypatch.setattr(live.state.engine, "call", stopped_before_running)
    payload = ({"lora_name": "late", "lora_path": "a3"} if path.startswith("/v1/load")
               else {"lora_name": "a1"})
    r = live.post(path, payload)
    assert r.status_code == 503 and "stopped before it ran" in r.json()["error"]["message"]
    names = {m.id for m in live.client().models.list().data}
    assert "a1" in names and "late" not in names


# ----- requests that used to be accepted, ignored or able to hurt other requests -------------------

def run_together(*fns) -> None:
    """Run the functions in threads at once (their requests share engine batches) and wait for all."""
    threads = [threading.Thread(target=f) for f in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_a_tiny_temperature_decodes_greedily_and_hurts_no_one(live):
    client = live.client()
    greedy = complete(client, "a1").choices[0].text
    results = {}

    def tiny():
        results["tiny"] = client.completions.create(model="a1", prompt="The capital of France is",
                                                    max_tokens=12, temperature=3.5e-38).choices[0].text

    def other():
        results["other"] = complete(client, "a2", max_tokens=20).choices[0].text

    run_together(tiny, other)
    assert results == {"tiny": greedy, "other": complete(client, "a2", max_tokens=20).choices[0].text}


def test_an_adapter_with_non_finite_logits_fails_only_its_own_requests(live, tmp_path):
    write_adapter(live.state.settings.adapter_roots[0] / "huge", live.state.engine.model, r=2,
                  targets=["o_proj"], seed=5, scale=1e18,
                  lora_alpha=1e30)
    assert live.post("/v1/load_lora_adapter", {"lora_name": "huge", "lora_path": "huge"}).status_code == 200
    try:
        client = live.client()
        outcome = {}

        def broken():
            try:
                complete(client, "huge", max_tokens=8)
            except openai.APIStatusError as exc:
                outcome["huge"] = (exc.status_code, exc.body["message"])

        def fine():
            outcome["a1"] = complete(client, "a1", max_tokens=20).choices[0].finish_reason

        run_together(fine, broken)
        assert outcome["a1"] == "length"
        status, message = outcome["huge"]
        assert status == 500 and "its adapter produced non-finite logits" in message
        engine = live.state.engine
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:  # the row leaves right after its error event
            time.sleep(0.01)
        assert engine.alive and engine.running == 0
    finally:
        live.post("/v1/unload_lora_adapter", {"lora_name": "huge"})


def test_one_created_time_per_response(live, monkeypatch):
    import loratune.serve.protocol as protocol

    ticks = iter(range(1_700_000_000, 1_800_000_000))
    monkeypatch.setattr(protocol.time, "time", lambda: next(ticks))
    chunks = list(live.client().chat.completions.create(
        model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True))
    assert len(chunks) > 3 and len({c.created for c in chunks}) == 1 and len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("field, value", [
    ("top_k", 5), ("min_p", 0.1), ("repetition_penalty", 1.2), ("ignore_eos", True), ("min_tokens", 3),
    ("stop_token_ids", [2]), ("tool_choice", "required"), ("functions", [{"name": "f"}]),
    ("audio", {"voice": "x"}), ("logprobs", 0), ("logprobs", 2),
    # vLLM's own fields: before, accepted and ignored (guided_json gave free text)
    ("guided_json", {"type": "object"}), ("guided_regex", "a+"), ("structured_outputs", {"json": {}}),
    ("allowed_token_ids", [1, 2]), ("bad_words", ["x"]), ("use_beam_search", True),
    ("truncate_prompt_tokens", 4), ("prompt_logprobs", 1), ("return_tokens_as_token_ids", True),
    ("include_stop_str_in_output", True), ("skip_special_tokens", False), ("chat_template", "{{ x }}"),
    ("chat_template_kwargs", {"enable_thinking": False}),
])
def test_sampling_fields_we_cannot_honour_are_400s_naming_them(live, field, value):
    body = expect_error(400, live.client().completions.create, model=BASE, prompt="x", max_tokens=1,
                        extra_body={field: value})
    assert body["param"] == field


def test_neutral_values_and_strict_types(live):
    client = live.client()
    assert client.completions.create(model=BASE, prompt="x", max_tokens=1, extra_body={
        "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "ignore_eos": False, "tool_choice": "none"})
    for payload, param in [({"stream": "yes"}, "stream"), ({"max_tokens": "5"}, "max_tokens"),
                           ({"max_tokens": 2.5}, "max_tokens"), ({"temperature": "0.5"}, "temperature"),
                           ({"stream_options": {"include_usage": True}},
                                                                  "stream_options"),
                           ({"stream": True, "stream_options": {"include_usage": "no"}}, "stream_options"),
                           ({"stream": True, "stream_options": {"continuous_usage_stats": True}},
                            "stream_options"),
                           ({"stream": True, "stream_options": {"usage": True}}, "stream_options"),
                           ({"prompt": [True, False]}, "prompt"), ({"prompt": [1.0, 2.0]}, "prompt")]:
        r = live.post("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 1, **payload})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # neutral: an empty stream_options without streaming, chat's logprobs false, vLLM's defaults
    assert client.completions.create(model=BASE, prompt="x", max_tokens=1, stream_options={},
                                     extra_body={"skip_special_tokens": True, "use_beam_search": False})
    assert client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=1, logprobs=False)


def test_a_chat_prompt_too_long_for_any_completion_names_the_messages(live):
    """No max_tokens sent: the prompt is what does not fit, and the error says so."""
    long = [{"role": "user", "content": "word " * 2000}]
    body = expect_error(413, live.client().chat.completions.create, model=BASE, messages=long)
    assert body["param"] == "messages" and "leaves no room for a completion" in body["message"]
    assert "max_tokens" not in body["message"].replace("--max-request-tokens", "")


def test_text_parts_of_a_message_are_joined_by_newlines_as_vllm_does(live):
    client = live.client()

    def prompt_tokens(content):
        return client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": content}],
                                              max_tokens=1, temperature=0).usage.prompt_tokens

    parts = [{"type": "text", "text": "alpha"}, {"type": "text", "text": "beta"}]
    assert prompt_tokens(parts) == prompt_tokens("alpha\nbeta")


@pytest.mark.parametrize("message, needle", [
    ({"role": "alien", "content": "hi"}, "messages[0].role 'alien' is not supported"),
    ({"role": "user"}, "messages[0].content is missing"),
    ({"role": "user", "content": [{"type": "text", "text": 5}]},
     "messages[0].content[0].text must be a string"),
])
def test_bad_chat_messages_are_400s_naming_the_message(live, message, needle):
    body = expect_error(400, live.client().chat.completions.create, model=BASE, messages=[message],
                        max_tokens=1)
    assert needle in body["message"] and body["param"] == "messages"


def test_developer_messages_are_system_messages(live):
    from loratune.serve import api
    from loratune.serve.protocol import ChatMessage

    def rendered(role):
        return api._chat_prompt(live.state, [ChatMessage(role=role, content="Be brief."),
                                             ChatMessage(role="user", content="hi")])

    assert rendered("developer") == rendered("system") != rendered("user")
    assert live.client().chat.completions.create(model=BASE, max_tokens=2, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]).choices


def test_full_queue_429_says_when_to_retry(tmp_path, monkeypatch):
    server = start_server(tmp_path, max_batch_size=1, max_queue=1)
    try:
        streams, release = fill_the_queue(server, monkeypatch)
        r = server.post("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        release.set()
        for s in streams:
            s.close()
    finally:
        server.stop()


def test_a_client_leaving_a_non_streaming_request_stops_its_generation(live, monkeypatch):
    engine = live.state.engine
    monkeypatch.setattr(engine, "eos_token_ids", set())
    forward = engine._forward

    def slow(**kwargs):  # >= 10 ms a step, so 500 tokens take >= 5 s on any machine
        time.sleep(0.01)
        return forward(**kwargs)

    monkeypatch.setattr(engine, "_forward", slow)
    before = engine.decoded_tokens
    with pytest.raises(httpx.ReadTimeout):
        live.post("/v1/completions", {"model": "a1", "prompt": "abc", "max_tokens": 500, "temperature": 0},
                  timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 10
    while (engine.running or engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and engine.queue_depth == 0
    assert engine.decoded_tokens - before < 250  # 0.5 s read timeout + 0.25 s poll: ~75 steps, not 500
    text = httpx.get(f"{live.url}/metrics").text
    assert 'loratune_requests_total{endpoint="completions",model="a1",status="499"}' in text


def test_unload_by_unknown_id_names_the_id(live):
    r = live.post("/v1/unload_lora_adapter", {"lora_int_id": 999})
    assert r.status_code == 404 and "lora_int_id 999" in r.json()["error"]["message"]


def test_text_that_is_not_utf8_is_a_400_naming_the_field(live):
    body = b'{"model": "%s", "prompt": "caf\\udce9", "max_tokens": 1}' % BASE.encode()
    r = httpx.post(f"{live.url}/v1/completions", content=body, timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "UTF-8" in r.text
    body = (b'{"model": "%s", "messages": [{"role": "user", "content": "caf\\udce9"}], "max_tokens": 1}'
            % BASE.encode())
    r = httpx.post(f"{live.url}/v1/chat/completions", content=body, timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "UTF-8" in r.text


def test_a_body_sent_without_a_json_content_type_says_so(live):
    r = httpx.post(f"{live.url}/v1/completions", content=b'{"model": "x", "prompt": "y"}', timeout=10,
                   headers={"Authorization": f"Bearer {KEY}",
                            "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"
    assert "Content-Type: application/json" in r.json()["error"]["message"]


def test_a_prompt_being_tokenized_does_not_hold_up_other_requests(live, monkeypatch):
    """Tokenizing runs beside the event loop: a request still answers while a long prompt is tokenized."""
    import loratune.serve.api as api

    tokenizing, answered, seen = threading.Event(), threading.Event(), {}
    real = api._completion_prompt

    def held_until_answered(state, prompt):
        tokenizing.set()
        seen["answered meanwhile"] = answered.wait(120)  # False: it gave up waiting for the health check
        return real(state, prompt)

    monkeypatch.setattr(api, "_completion_prompt", held_until_answered)
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=complete(live.client(), BASE, max_tokens=2)))
    thread.start()
    assert tokenizing.wait(120)
    assert httpx.get(f"{live.url}/health", timeout=None).status_code == 200
    answered.set()
    thread.join()
    assert seen["answered meanwhile"], "the health check waited for the prompt's tokenization"
    assert result["r"].choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("reload", [False, True])
def test_an_adapter_unloaded_while_its_prompt_is_tokenized_is_never_served_as_the_base(live, monkeypatch,
                                                                                     reload):
    """The adapter is looked up again once the prompt is tokenized: unloaded meanwhile, the request is
    a 404; reloaded under the same name, it runs the new adapter."""
    import loratune.serve.api as api

    assert live.post("/v1/load_lora_adapter", {"lora_name": "racer", "lora_path": "a3"}).status_code == 200
    client = live.client()
    expected = complete(client, "a2").choices[0].text if reload else None
    tokenizing, go_on = threading.Event(), threading.Event()
    real = api._completion_prompt

    def held(state, prompt):
        tokenizing.set()
        go_on.wait(120)
        return real(state, prompt)

    monkeypatch.setattr(api, "_completion_prompt", held)
    result = {}

    def racer():
        try:
            result["text"] = complete(client, "racer").choices[0].text
        except openai.APIStatusError as exc:
            result["status"] = exc.status_code

    thread = threading.Thread(target=racer)
    thread.start()
    try:
        assert tokenizing.wait(120)
        assert live.post("/v1/unload_lora_adapter", {"lora_name": "racer"}).status_code == 200
        if reload:
            r = live.post("/v1/load_lora_adapter", {"lora_name": "racer", "lora_path": "a2"})
            assert r.status_code == 200
    finally:
        go_on.set()
        thread.join()
        live.post("/v1/unload_lora_adapter", {"lora_name": "racer"})
    assert result == ({"text": expected} if reload else {"status": 404})


def test_models_retrieve_returns_one_card_or_a_404(live):
    client = live.client()
    card = client.models.retrieve("a1")
    assert card.id == "a1" and card.owned_by == "loratune"
    assert client.models.retrieve(BASE).id == BASE
    body = expect_error(404, client.models.retrieve, "nope")
    assert body["code"] == "model_not_found"


def test_a_message_name_reaches_the_chat_template(live, monkeypatch):
    seen = []
    real = live.state.tokenizer.apply_chat_template

    def spy(messages, *args, **kwargs):
        seen.append(messages)
        return real(messages, *args, **kwargs)

    monkeypatch.setattr(live.state.tokenizer, "apply_chat_template", spy)
    live.client().chat.completions.create(model=BASE, max_tokens=1, messages=[
        {"role": "user", "content": "hi", "name": "ana"}, {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"}])
    assert seen[-1][0] == {"role": "user", "content": "hi", "name": "ana"} and "name" not in seen[-1][1]
    r = live.post("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x",
                                                                        "name": 5}]})
    assert r.status_code == 400 and "name" in r.text


def test_requests_without_sampling_fields_take_the_models_generation_config_as_vllm_does(tmp_path, caplog):
    from loratune.serve.server import sampling_defaults

    model = load_base_model("preset:tiny-llama", dtype="float32")
    assert sampling_defaults(model) == {}  # nothing set: 1.0 and 1.0
    model.generation_config.temperature, model.generation_config.top_p = 0.6, 0.9
    model.generation_config.top_k = 20
    with caplog.at_level("INFO", logger="loratune"):
        assert sampling_defaults(model) == {"temperature": 0.6, "top_p": 0.9}
    assert "not applied: {'top_k': 20}" in caplog.text
    model.generation_config.temperature = 7.0
    assert sampling_defaults(model) == {"top_p": 0.9}  # out of range: not used, with a warning
    model.generation_config.temperature = 0.6
    app, state = build_server(model, load_tokenizer("preset:tiny-llama"), ServeSettings(base_name=BASE),
                              num_threads=1)
    try:
        assert state.sampling(3, 4, None, None, None).temperature == 0.6
        assert state.sampling(3, 4, None, None, None).top_p == 0.9
        assert state.sampling(3, 4, 0.0, 1.0, None).temperature == 0.0  # a request's own values win
    finally:
        state.engine.stop()
