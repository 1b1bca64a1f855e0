"""Hostile input against `loratune serve`: headers, paths, names, adapter files, request bodies.

One app (tiny Llama, adapter a1) serves every case through Starlette's TestClient (no socket). Each
case asserts the status and the message, that no server path leaks, and that the server still
gives the same greedy answer as before. Slow clients, and a bad adapter arriving while other
adapters stream, need a real uvicorn on 127.0.0.1 (at the end).
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loratune import LoraConfig, module_patterns
from loratune.serve.lora_rows import RowAdapterWeights, linear_shapes
from loratune.serve.registry import PreparedAdapter
from loratune.serve.server import build_server, uvicorn_settings
from loratune.serve.state import AdapterEntry, ServeSettings
from loratune.tools.loading import load_base_model, load_tokenizer
from test_serve_api import BASE, KEY, LiveServer, write_adapter

AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"model": "a1", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}


class Served:
    def __init__(self, tmp, **settings):
        self.tmp = tmp
        self.model = load_base_model("preset:tiny-llama", dtype="float32")
        self.root = tmp / "root"
        write_adapter(self.root / "a1", self.model, r=4, targets=["q_proj", "v_proj"], seed=1)
        write_adapter(self.root / "a2", self.model, r=8, targets=["q_proj", "o_proj"], seed=2)
        self.settings = ServeSettings(base_name=BASE, api_keys=[KEY], adapter_roots=[self.root],
                                      max_request_tokens=256, max_body_bytes=64 * 1024, **settings)
        self.app, self.state = build_server(self.model, load_tokenizer("preset:tiny-llama"), self.settings,
                                            adapters={"a1": str(self.root / "a1")}, num_threads=1)

    def greedy(self, client) -> str:
        r = client.post("/v1/completions", json=GREEDY, headers=AUTH)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]


def serving(tmp):
    """A started `Served` with its client and greedy baseline (for module fixtures); stops its engine."""
    s = Served(tmp)
    with TestClient(s.app, raise_server_exceptions=False) as client:
        s.client = client
        s.baseline = s.greedy(client)
        yield s
    s.state.engine.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("hostile"))


def check(served, r: httpx.Response, status: int, needle: str) -> dict:
    """Assert status and message, that no server path leaks, and the greedy answer is unchanged."""
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert needle in error["message"], error["message"][:500]
    assert str(served.tmp) not in r.text and "Traceback" not in r.text
    assert len(r.text) < 5000
    assert served.greedy(served.client) == served.baseline
    assert served.client.get("/health").status_code == 200
    return error


# ----- the Authorization header ------------------------------------------------------------------

AUTH_HEADERS = {
    "latin1_bytes": b"Bearer \xff\xfe\xfd",
    "utf8_accent": "Bearer tést-key".encode(),
    "key_plus_byte": KEY.encode() + b"\xff",
    "bearer_key_plus_byte": b"Bearer " + KEY.encode() + b"\xff",
    "no_scheme_high_bytes": b"\x80\x81\x82",
    "cyrillic": "Bearer ключ".encode(),
    "emoji": "Bearer 🔑".encode(),
    "basic": b"Basic dGVzdC1rZXk=",
    "scheme_only": b"Bearer",
    "empty": b"",
    "long": b"Bearer " + b"A" * 60_000,
    "prefix": b"Bearer " + KEY.encode()[:-1],
    "tab": b"Bearer\t" + KEY.encode(),
    "token_scheme": b"Token " + KEY.encode(),
}


@pytest.mark.parametrize("name", sorted(AUTH_HEADERS))
def test_a_bad_authorization_header_is_401(name, served):
    r = served.client.post("/v1/completions", json=GREEDY, headers={"Authorization": AUTH_HEADERS[name]})
    error = check(served, r, 401, "Invalid or missing API key")
    assert error["type"] == "authentication_error"


def test_internal_errors_carry_a_request_id_and_no_details(served, monkeypatch, caplog):
    monkeypatch.setattr(served.state, "adapter_id", lambda model: 1 / 0)
    r = served.client.post("/v1/completions", json=GREEDY, headers=AUTH)
    monkeypatch.undo()
    error = check(served, r, 500, "internal error (request id req-")
    assert "ZeroDivisionError" not in r.text and "division" not in r.text
    request_id = error["message"].split("request id ")[1].rstrip(")")
    assert request_id in caplog.text and "ZeroDivisionError" in caplog.text
    assert caplog.text.count("Traceback") == 1  # logged once, not once more by the server


# ----- lora_path, lora_name ----------------------------------------------------------------------


def load(served, name, path):
    body = json.dumps({"lora_name": name, "lora_path": path})  # ASCII: lone surrogates as \ud800
    return served.client.post("/v1/load_lora_adapter", content=body,
                              headers={**AUTH, "Content-Type": "application/json"})


@pytest.fixture(scope="module")
def outside(served):
    """An adapter outside the root, and links to it from inside."""
    out = write_adapter(served.tmp / "outside", served.model, r=4, targets=["q_proj"], seed=7)
    (served.root / "escape").symlink_to(out, target_is_directory=True)
    for linked in ("adapter_config.json", "adapter_model.safetensors"):
        folder = write_adapter(served.root / f"linked-{linked.split('.')[0]}", served.model, r=4,
                               targets=["q_proj"], seed=7)
        (folder / linked).unlink()
        (folder / linked).symlink_to(out / linked)
    (served.root / "loop").symlink_to(served.root / "loop")
    return out


PATHS = {
    "6000_chars": ("x" * 6000, 400, "characters, over the limit of 4096"),
    "long_component": ("a/" + "b" * 300, 400, "a path component of 300 bytes"),
    "long_utf8_component": ("é" * 200, 400, "a path component of 400 bytes"),
    "nul": ("a1\x00", 400, "control characters"),
    "newline": ("a1\n", 400, "control characters"),
    "escape_char": ("a1\x1b[2J", 400, "control characters"),
    "lone_surrogate": ("\ud800", 400, "not valid Unicode"),
    "dotdot": ("../../etc", 400, "outside the adapter roots"),
    "absolute": ("/etc", 400, "outside the adapter roots"),
    "root": ("/", 400, "outside the adapter roots"),
    "dotdot_after": ("a1/../../..", 400, "outside the adapter roots"),
    "proc": ("/proc/self/root/etc", 400, "outside the adapter roots"),
    "symlinked_folder": ("escape", 400, "outside the adapter roots"),
    "symlinked_config": ("linked-adapter_config", 400, "adapter_config.json in the adapter folder is a link"),
    "symlinked_weights": ("linked-adapter_model", 400,
                          "adapter_model.safetensors in the adapter folder is a link"),
    "symlink_loop": ("loop", 400, "cannot be resolved"),
    "a_file": ("a1/adapter_config.json", 404, "No adapter found"),
    "missing": ("nope", 404, "No adapter found"),
    "empty": ("", 400, "Both 'lora_name' and 'lora_path' must be provided."),
}


@pytest.mark.parametrize("name", sorted(PATHS))
def test_a_hostile_lora_path_is_refused_without_echoing_server_paths(name, served, outside):
    path, status, needle = PATHS[name]
    r = load(served, "new", path)
    check(served, r, status, needle)
    assert "new" not in served.state.adapters


@pytest.mark.parametrize("path", [12345, ["a1"], {"p": "a1"}, None, True])
def test_a_lora_path_that_is_not_a_string_is_400(path, served):
    r = load(served, "new", path)
    check(served, r, 400, "lora_path")


NAMES = {
    "10k": ("n" * 10_000, "invalid adapter name 'nnnn"),
    "129": ("n" * 129, "invalid adapter name"),
    "accent": ("é", "invalid adapter name"),
    "slash": ("../x", "invalid adapter name"),
    "dot": (".", "invalid adapter name"),
    "space": ("a b", "invalid adapter name"),
    "nul": ("a\x00", "invalid adapter name"),
    "reserved": ("__base__", "reserved for the base model"),
    "base": (BASE, "reserved for the base model"),
    "duplicate": ("a1", "has already been loaded"),
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_a_hostile_lora_name_is_400(name, served):
    lora_name, needle = NAMES[name]
    check(served, load(served, lora_name, "a2"), 400, needle)


# ----- adapter files -----------------------------------------------------------------------------

def _config(**fields) -> bytes:
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    return json.dumps({**base, **fields}).encode()


ADAPTERS = {
    "invalid_utf8": (b'{"r": 4, "x": "\xff"}', "is not UTF-8 text"),
    "latin1": ('{"r": 4, "x": "caf\xe9"}'.encode("latin-1"), "is not UTF-8 text"),
    "utf16": (_config().decode().encode("utf-16"), "is not UTF-8 text"),
    "deep_lists": (b"[" * 100_000 + b"]" * 100_000, "nests 100000 levels deep"),
    "deep_objects": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nests 100000 levels deep"),
    "huge": (b'{"x": "' + b"a" * (1 << 20) + b'"}', "is over 1,048,576 bytes"),
    "not_object": (b"[]", "expected a JSON object"),
    "truncated": (b'{"r": 4', "invalid JSON"),
    "targets_nothing": (_config(target_modules=["foo_proj"]), "match no linear layer of the base model"),
    "regex_nothing": (_config(target_modules=".*foo"), "match no linear layer of the base model"),
    "layers_nothing": (_config(layers_to_transform=[7]), "match no linear layer of the base model"),
    "excluded_all": (_config(exclude_modules=".*"), "match no linear layer of the base model"),
    "counted_repeats": (_config(target_modules="((a{1000}){1000}){1000}"), "repeats too much"),
    "alpha_nan": (_config(lora_alpha=float("nan")), "lora_alpha must be a finite number, got nan"),
    "alpha_inf": (_config(lora_alpha=float("inf")), "lora_alpha must be a finite number, got inf"),
    "alpha_neg_inf": (_config(lora_alpha=float("-inf")), "must be a finite number, got -inf"),
    "alpha_1e308": (_config(lora_alpha=1e308), "overflows float32"),
    "alpha_bigint": (b'{"r": 4, "lora_alpha": 1' + b"0" * 400 + b', "target_modules": ["q_proj"]}',
                     "lora_alpha must be a finite number"),
    "alpha_pattern_inf": (_config(alpha_pattern={"q_proj": float("inf")}), "must be a finite number"),
    "r_1e9": (_config(r=10**9), "gives this layer r=1000000000"),
    "r_mismatch": (_config(r=8), "gives this layer r=8"),
    "dora": (_config(use_dora=True), "use_dora"),
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_a_hostile_adapter_config_fails_its_load_only(name, served):
    folder = write_adapter(served.root / f"bad-{name}", served.model, r=4, targets=["q_proj"], seed=3)
    raw, needle = ADAPTERS[name]
    (folder / "adapter_config.json").write_bytes(raw)
    check(served, load(served, f"bad-{name}", f"bad-{name}"), 400, needle)
    assert f"bad-{name}" not in served.state.adapters


@pytest.mark.parametrize("pattern", [r"(.|..)+\d", r"(.|..)*[0-9]", r"(\w|\w\w|.)+\d"])
def test_a_backtracking_target_regex_fails_fast_and_health_stays_fast(pattern, served, monkeypatch):
    monkeypatch.setattr(module_patterns, "MATCH_BUDGET_S", 0.0001)  # far below any machine's time
    module_patterns._too_slow.clear()
    folder = write_adapter(served.root / "bomb", served.model, r=4, targets=["q_proj"], seed=3)
    (folder / "adapter_config.json").write_bytes(_config(target_modules=pattern))
    check(served, load(served, "bomb", "bomb"), 400, "took over 0.0001s to match")


@pytest.mark.parametrize("damage", ["overflow_fp", "nan", "scalar", "int_dtype", "float8_nan"])
def test_hostile_adapter_weights_fail_their_load_only(damage, served):
    folder = write_adapter(served.root / f"w-{damage}", served.model, r=4, targets=["q_proj"], seed=3)
    shapes = {k: v for k, v in linear_shapes(served.model).items() if k.endswith("q_proj")}
    tensors = {}
    for module, (i, o) in shapes.items():
        a, b = torch.randn(4, i), torch.randn(o, 4)
        if damage == "nan":
            a[0, 0] = float("nan")
        elif damage == "scalar":
            a = torch.tensor(1.0)
        elif damage == "int_dtype":
            a = a.to(torch.int32)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    if damage == "overflow_fp":
        tensors = {k: v.double() * 1e300 for k, v in tensors.items()}
    if damage == "float8_nan":  # torch has no isfinite for float8: this used to be a 500
        tensors = {k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}
        next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    needle = {"overflow_fp": "overflows torch.float32", "nan": "hold NaN or Inf",
              "scalar": "has shape ()", "int_dtype": "are not floating point",
              "float8_nan": "hold NaN or Inf"}[damage]
    check(served, load(served, f"w-{damage}", f"w-{damage}"), 400, needle)


@pytest.mark.parametrize("lora_int_id", [True, "1", 1.0])
def test_an_unload_lora_int_id_that_is_not_an_integer_is_400_and_unloads_nothing(lora_int_id, served):
    r = served.client.post("/v1/unload_lora_adapter", json={"lora_int_id": lora_int_id}, headers=AUTH)
    assert check(served, r, 400, "lora_int_id: Input should be a valid integer")["param"] == "lora_int_id"
    assert served.state.adapters["a1"].adapter_id == 1  # `true` used to unload adapter id 1


def test_a_float8_adapter_is_served_cast_to_the_serving_dtype(served):
    folder = write_adapter(served.root / "w-f8", served.model, r=4, targets=["q_proj"], seed=3)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    weights = str(folder / "adapter_model.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}, weights)
    assert load(served, "w-f8", "w-f8").status_code == 200
    r = served.client.post("/v1/completions", json={**GREEDY, "model": "w-f8"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert served.client.post("/v1/unload_lora_adapter", json={"lora_name": "w-f8"},
                              headers=AUTH).status_code == 200


def _installed_ids(served) -> set[int]:
    return {i for m in served.model.modules() for i in getattr(m, "adapters", {})}


def _give_up_while_queued(served, coro) -> None:
    """Run a load/unload until its engine command is queued behind a held engine, then cancel it."""
    engine, started, gate = served.state.engine, threading.Event(), threading.Event()
    engine.call(lambda: (started.set(), gate.wait(30)))
    # The engine takes every queued command at once: only once it is inside the held one does a new
    # command stay queued (waiting here, not in the coroutine, keeps the two from being taken together).
    assert started.wait(30)

    async def give_up():
        task = asyncio.ensure_future(coro)
        while not engine._commands and not task.done():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(give_up())
    finally:
        gate.set()
    engine.call(lambda: None).result(30)  # the queued command has run (or been skipped)


def test_a_load_or_unload_whose_caller_stops_waiting_keeps_the_engine_and_adapters_consistent(served):
    # A cancelled waiter used to make the engine thread raise InvalidStateError and die.
    _give_up_while_queued(served, served.state.load_adapter("late", "a2"))
    assert served.state.engine.alive and "late" not in served.state.adapters
    assert _installed_ids(served) == {e.adapter_id for e in served.state.adapters.values()}
    assert load(served, "late", "a2").status_code == 200
    _give_up_while_queued(served, served.state.unload_adapter("late", None))
    assert "late" not in served.state.adapters
    assert _installed_ids(served) == {e.adapter_id for e in served.state.adapters.values()}  # weights freed
    assert served.greedy(served.client) == served.baseline


def test_adapter_names_that_come_and_go_leave_no_metric_series(served):
    def series() -> list[str]:
        return [line for line in served.client.get("/metrics").text.splitlines() if not line.startswith("#")]

    before = series()
    for i in range(3):
        assert load(served, f"gone{i}", "a2").status_code == 200
        r = served.client.post("/v1/completions", json={**GREEDY, "model": f"gone{i}"}, headers=AUTH)
        assert r.status_code == 200 and any(f'model="gone{i}"' in line for line in series())
        assert served.client.post("/v1/unload_lora_adapter", json={"lora_name": f"gone{i}"},
                                  headers=AUTH).status_code == 200
    after = series()
    assert not [line for line in after if "gone" in line]
    assert len(after) == len(before)


# ----- request bodies ----------------------------------------------------------------------------

BODIES = {
    "not_json": (b"{", "application/json", 400, "not valid JSON"),
    "not_utf8": (b'{"model": "a1", "prompt": "\xff\xfe"}', "application/json", 400, "not valid JSON"),
    "deep_lists": (b"[" * 30_000 + b"]" * 30_000, "application/json", 400, "not valid JSON"),
    "deep_prompt": (b'{"model": "a1", "prompt": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
                    "application/json", 400, "not valid JSON"),
    "text_plain": (json.dumps(GREEDY).encode(), "text/plain", 400, "Content-Type: application/json"),
    "huge": (b'{"prompt": "' + b"a" * 70_000 + b'"}', "application/json", 413, "over the limit of 65536"),
    "long_model": (json.dumps({**GREEDY, "model": "m" * 50_000}).encode(), "application/json", 404,
                   "(50000 characters)` does not exist"),
    "surrogate_prompt": (b'{"model": "a1", "prompt": "\\ud800", "max_tokens": 2}', "application/json", 400,
                         "UTF-8"),
    "negative_max_tokens": (json.dumps({**GREEDY, "max_tokens": -1}).encode(), "application/json", 400,
                            "max_tokens"),
    "huge_max_tokens": (json.dumps({**GREEDY, "max_tokens": 10**30}).encode(), "application/json", 400,
                        "max_tokens"),
    "nan_temperature": (b'{"model": "a1", "prompt": "x", "temperature": NaN}', "application/json", 400,
                        "temperature"),
    "inf_top_p": (b'{"model": "a1", "prompt": "x", "top_p": Infinity}', "application/json", 400, "top_p"),
    "token_ids_out_of_vocab": (json.dumps({**GREEDY, "prompt": [10**9]}).encode(), "application/json", 400,
                               "outside the model's vocabulary"),
    "two_prompts": (json.dumps({**GREEDY, "prompt": ["a", "b"]}).encode(), "application/json", 400,
                    "holds 2 prompts"),
    "prompt_object": (json.dumps({**GREEDY, "prompt": {"a": 1}}).encode(), "application/json", 400,
                      "prompt"),
    "body_array": (b"[1, 2, 3]", "application/json", 400, "invalid request"),
}


@pytest.mark.parametrize("name", sorted(BODIES))
def test_a_hostile_request_body_is_a_clean_4xx(name, served):
    body, kind, status, needle = BODIES[name]
    r = served.client.post("/v1/completions", content=body, headers={**AUTH, "Content-Type": kind})
    check(served, r, status, needle)


def post_json(served, path: str, raw: str) -> httpx.Response:
    """POST JSON text as it is (json.dumps writes a lone surrogate as the escape \\ud800)."""
    headers = {**AUTH, "Content-Type": "application/json"}
    return served.client.post(path, content=raw.encode(), headers=headers)


CHAT = {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_model_name_with_a_lone_surrogate_is_a_404_naming_the_model(path, stream, served):
    body = {**GREEDY, "model": "a\ud800", "stream": stream, "messages": CHAT["messages"]}
    r = post_json(served, path, json.dumps(body))
    error = check(served, r, 404, r"The model `a\ud800` does not exist")
    assert error["param"] == "model"


HUGE_VALUES = {
    "logit_bias": ("/v1/completions", {**GREEDY, "logit_bias": {str(i): 1 for i in range(4000)}}, 400),
    "tools": ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function",
                                                          "function": {"name": "f" * 40_000}}]}, 400),
    "n": ("/v1/completions", {**GREEDY, "n": 10**100}, 400),
    "prompt": ("/v1/completions", {**GREEDY, "prompt": [10**4000]}, 400),
    "messages": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "r" * 40_000, "content": "x"}]}, 400),
    "lora_int_id": ("/v1/unload_lora_adapter", {"lora_int_id": 10**4000}, 404),
}


@pytest.mark.parametrize("field", sorted(HUGE_VALUES))
def test_a_huge_refused_value_is_named_but_not_echoed_in_full(field, served):
    path, body, status = HUGE_VALUES[field]
    r = post_json(served, path, json.dumps(body))
    error = check(served, r, status, "characters)")  # check() also holds the reply under 5000 characters
    assert field in error["message"]


@pytest.mark.parametrize("stop, needle", [
    ([f"stop{i}" for i in range(17)], "stop holds 17 strings; at most 16"),
    ("x" * 257, "stop holds a string of 257 characters; at most 256"),
    (["a", "y" * 10_000], "stop holds a string of 10000 characters"),
])
def test_too_many_or_too_long_stop_strings_are_400_naming_stop(stop, needle, served):
    r = served.client.post("/v1/completions", json={**GREEDY, "stop": stop}, headers=AUTH)
    assert check(served, r, 400, needle)["param"] == "stop"


def test_the_most_stop_strings_allowed_are_honoured(served):
    stops = [f"{i:0256d}" for i in range(15)] + [served.baseline[1:4]]
    r = served.client.post("/v1/completions", json={**GREEDY, "stop": stops}, headers=AUTH)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (served.baseline[:1], "stop")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"])
def test_a_json_body_without_a_content_type_says_to_send_one(path, served):
    r = served.client.post(path, content=json.dumps(GREEDY).encode(), headers=AUTH)  # like requests' data=
    error = check(served, r, 400, "Content-Type: application/json' (got no Content-Type)")
    assert error["code"] == "invalid_content_type"


TOOL_CALL = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]


@pytest.mark.parametrize("field, value", [("tool_calls", TOOL_CALL),
                                          ("function_call", {"name": "f", "arguments": "{}"})])
def test_tool_calls_in_the_chat_history_are_400_naming_the_message(field, value, served):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, field: value},
                {"role": "user", "content": "and?"}]
    r = served.client.post("/v1/chat/completions", json={**CHAT, "messages": messages}, headers=AUTH)
    error = check(served, r, 400, f"messages[1].{field} is not supported")
    assert error["param"] == "messages"


def test_an_assistant_message_replayed_from_a_reply_is_accepted(served):
    replayed = {"role": "assistant", "content": "hello", "tool_calls": None, "function_call": None,
                "refusal": None, "audio": None, "annotations": []}  # openai's ChatCompletionMessage dump
    messages = [{"role": "user", "content": "hi"}, replayed, {"role": "user", "content": "and?"}]
    r = served.client.post("/v1/chat/completions", json={**CHAT, "messages": messages}, headers=AUTH)
    assert r.status_code == 200, r.text


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                       children, max_size=4),
                    max_leaves=12)
FIELDS = {"model": st.sampled_from(["a1", BASE, "nope", ""]) | st.text(max_size=30) | JSON,
          "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 70_000), max_size=6) | JSON,
          "max_tokens": st.integers(-3, 3) | st.sampled_from([10**12, None]) | JSON,
          "temperature": st.floats(allow_nan=True) | JSON, "top_p": st.floats() | JSON,
          "stream": st.booleans() | JSON, "stop": st.text(max_size=5) | JSON, "seed": st.integers() | JSON}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_any_completion_body_is_answered_in_openai_shape_never_500(served, body):
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 3:
        body["max_tokens"] = 3
    r = served.client.post("/v1/completions", content=json.dumps(body),  # NaN and Infinity too
                           headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code in (200, 400, 404, 413), (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.fixed_dictionaries({}, optional={"model": FIELDS["model"], "max_tokens": st.integers(0, 3) | JSON,
                                           "messages": st.lists(st.fixed_dictionaries(
                                               {}, optional={"role": st.sampled_from(["user", "system", "x"])
                                                             | JSON, "content": st.text(max_size=20) | JSON}),
                                               max_size=3) | JSON}))
def test_any_chat_body_is_answered_in_openai_shape_never_500(served, body):
    r = served.client.post("/v1/chat/completions", content=json.dumps(body),
                           headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code in (200, 400, 404, 413), (r.status_code, r.text[:300])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.fixed_dictionaries({}, optional={"lora_name": st.text(max_size=300) | JSON,
                                           "lora_path": st.text(max_size=300) | JSON}))
def test_any_load_body_is_a_clean_4xx(served, body):
    r = served.client.post("/v1/load_lora_adapter", content=json.dumps(body),
                           headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code in (400, 404), (r.status_code, r.text[:300])
    assert str(served.tmp) not in r.text


def test_after_the_corpus_the_answer_and_adapters_are_as_before(served):
    assert served.greedy(served.client) == served.baseline
    assert set(served.state.adapters) == {"a1"}


# ----- a real socket: bad adapters while others stream, slow clients ------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("live"), header_timeout_s=2, body_timeout_s=0.5, max_connections=8)
    s.state.adapters["a2"] = AdapterEntry("a2", str(s.root / "a2"), 2)
    from loratune.serve.registry import prepare_adapter

    s.state.engine.install_adapter(2, prepare_adapter("a2", s.root / "a2", s.state.shapes,
                                                      s.state.dtype)).result()
    server = LiveServer(s.app, s.state, **{**uvicorn_settings(s.settings), "timeout_keep_alive": 0.5})
    yield s, server
    server.stop()


def _stream_text(url: str, model: str) -> str:
    body = {**GREEDY, "model": model, "max_tokens": 24, "stream": True}
    text = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                text.append(chunk["choices"][0]["text"] if "choices" in chunk and chunk["choices"] else
                            f"<error {chunk.get('error', {}).get('message')}>")
    return "".join(text)


def test_a_bad_adapter_in_the_batch_fails_only_its_own_requests(live):
    served, server = live
    baseline = {m: _stream_text(server.url, m) for m in ("a1", "a2", BASE)}
    engine = served.state.engine
    # An adapter whose scaling overflows float32, installed behind the load-time checks' back.
    module = next(n for n in served.state.shapes if n.endswith("q_proj"))
    i, o = served.state.shapes[module]
    evil = PreparedAdapter("evil", "x", LoraConfig(), {module: RowAdapterWeights(torch.ones(4, i),
                                                                                  torch.ones(o, 4), 1e308)})
    engine.install_adapter(99, evil).result()
    served.state.adapters["evil"] = AdapterEntry("evil", "x", 99)
    gate = threading.Event()
    engine.call(lambda: gate.wait(30))  # hold the engine so that all rows start in one batch
    results: dict[str, str] = {}
    models = ["a1", "evil", "a2", BASE, "a1"]
    threads = [threading.Thread(target=lambda k=k, m=m: results.__setitem__(k, _stream_text(server.url, m)))
               for k, m in enumerate(models)]
    for t in threads:
        t.start()
    loads = {}
    for name, raw in (("bad1", _config(lora_alpha=1e308)), ("bad2", _config(target_modules=["foo_proj"])),
                      ("bad3", _config(lora_alpha=float("nan")))):
        folder = write_adapter(served.root / name, served.model, r=4, targets=["q_proj"], seed=3)
        (folder / "adapter_config.json").write_bytes(raw)
        loads[name] = httpx.post(f"{server.url}/v1/load_lora_adapter",
                                 json={"lora_name": name, "lora_path": name}, headers=AUTH, timeout=30)
    while engine.queue_depth < len(models):  # every request is queued behind the gate
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(60)
    assert "out of range for the served dtype" in results[1]
    for k, m in enumerate(models):
        if m != "evil":
            assert results[k] == baseline[m], (m, results[k])
    assert all(r.status_code == 400 for r in loads.values()), {k: r.text for k, r in loads.items()}
    del served.state.adapters["evil"]
    engine.remove_adapter(99).result()
    assert _stream_text(server.url, "a1") == baseline["a1"]


def _connect(port: int):
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def _closed(sock, wait: float = 5.0) -> bool:
    sock.settimeout(wait)
    try:
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True
            data += chunk
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_slow_header_connection_is_closed(live):
    _, server = live
    sock = _connect(server.port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    assert _closed(sock)
    sock.close()
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_connection_that_sends_nothing_is_closed(live):
    _, server = live
    sock = _connect(server.port)
    assert _closed(sock)
    sock.close()


def _post_slowly(port: int, headers: bytes, first_body_bytes: bytes) -> bytes:
    """Send a POST whose body stops after `first_body_bytes`; return everything until the server closes."""
    sock = _connect(port)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Type: application/json\r\n" + headers + b"\r\n" + first_body_bytes)
    reply = b""
    while chunk := sock.recv(4096):  # headers and body may arrive in separate segments
        reply += chunk
    sock.close()
    return reply


def test_a_slow_body_gets_408_and_is_closed(live):
    _, server = live
    reply = _post_slowly(server.port, b"Content-Length: 100\r\n", b'{"model"')
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5s" in reply


def test_a_chunked_slow_body_gets_408(live):
    _, server = live
    reply = _post_slowly(server.port, b"Transfer-Encoding: chunked\r\n", b'2\r\n{"\r\n')
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5s" in reply


def test_connections_over_the_limit_get_503_and_the_server_recovers(live):
    _, server = live
    held = []
    for _ in range(8):
        sock = _connect(server.port)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # hold a slot until the header timeout
        held.append(sock)
    extra = _connect(server.port)
    extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    extra.settimeout(5)
    assert extra.recv(4096).startswith(b"HTTP/1.1 503")
    for sock in [*held, extra]:
        sock.close()
    for _ in range(50):  # the held slots are freed when their sockets close
        if httpx.get(f"{server.url}/health").status_code == 200:
            break
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_prompt_ids_past_the_models_embedding_rows_are_refused_not_run(served, monkeypatch):
    """A tokenizer with more tokens than the embedding has rows: such an id would fail the whole
    batched step it is prefilled in, so it is a 400 naming the field, for text and token prompts."""
    from loratune.serve.state import token_rows

    rows = served.model.get_input_embeddings().num_embeddings
    assert token_rows(served.model, served.state.tokenizer) == min(len(served.state.tokenizer), rows)
    assert token_rows(object(), served.state.tokenizer) == len(served.state.tokenizer)
    monkeypatch.setattr(served.state, "vocab", 5)
    chat = {"model": "a1", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 2}
    for route, body, field in (("/v1/completions", {**GREEDY, "prompt": "hello world"}, "prompt"),
                               ("/v1/completions", {**GREEDY, "prompt": [1, 7]}, "prompt"),
                               ("/v1/chat/completions", chat, "messages")):
        r = served.client.post(route, json=body, headers=AUTH)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and "outside the model's vocabulary [0, 5)" in error["message"]
    monkeypatch.undo()
    assert served.greedy(served.client) == served.baseline


def test_load_inplace_replaces_a_loaded_adapter_and_without_it_the_name_is_taken(served):
    """vLLM's load_inplace: the name then serves the new weights; the old ones are freed."""
    def answer(model):
        r = served.client.post("/v1/completions", json={**GREEDY, "model": model}, headers=AUTH)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert load(served, "inplace-x", "a2").status_code == 200
    want_a2 = answer("inplace-x")
    r = served.client.post("/v1/unload_lora_adapter", json={"lora_name": "inplace-x"}, headers=AUTH)
    assert r.status_code == 200
    installed = len(served.state.adapters), set(served.state.engine._installed)
    assert want_a2 != served.baseline  # the two adapters answer differently: the test can tell them apart
    r = load(served, "a1", "a2")
    assert r.status_code == 400 and "has already been loaded" in r.json()["error"]["message"]
    body = {"lora_name": "a1", "lora_path": "a2", "load_inplace": True}
    assert served.client.post("/v1/load_lora_adapter", json=body, headers=AUTH).status_code == 200
    assert answer("a1") == want_a2 and len(served.state.adapters) == installed[0]
    assert len(served.state.engine._installed) == len(installed[1])  # the old weights are gone
    body["lora_path"] = "a1"  # and back, for the tests that follow
    assert served.client.post("/v1/load_lora_adapter", json=body, headers=AUTH).status_code == 200
    assert served.greedy(served.client) == served.baseline
