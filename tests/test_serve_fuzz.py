"""Fuzzed requests against `loratune serve`: every route, seeded and bounded, never a 5xx.

A seeded generator mutates a valid body of each POST route (wrong types for every known field, NaN,
huge numbers, lone surrogates, nested values, missing and unknown fields, broken JSON, odd
Content-Types) and checks each answer: no 5xx, OpenAI's error envelope on errors, well-formed SSE
ending in `data: [DONE]` when streamed, no traceback or server path, and the server still answers
a normal request the same way. The cases the fuzzer found stay below as named tests, with the
`openai` client's view of realistic-but-wrong calls at the end.
"""

from __future__ import annotations

import copy
import json
import random

import openai
import pytest

from loratune.serve.protocol import UNSUPPORTED
from test_hostile_server import AUTH, GREEDY, serving
from test_serve_api import BASE, KEY, LiveServer

JSON_HEADERS = {**AUTH, "Content-Type": "application/json"}
CHAT = {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
SAMPLING = ["model", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "stream_options",
            "logprobs", "user"]
ROUTES = {  # a valid body, and the fields the fuzzer rewrites ("a.0.b" reaches into lists)
    "/v1/completions": ({**GREEDY, "max_tokens": 2}, SAMPLING + ["prompt"] + sorted(UNSUPPORTED)),
    "/v1/chat/completions": (CHAT, SAMPLING + ["messages", "max_completion_tokens", "messages.0.role",
                                               "messages.0.content", "messages.0.name", "messages.0.x"]
                             + sorted(UNSUPPORTED)),
    "/v1/load_lora_adapter": ({"lora_name": "fz", "lora_path": "a2"},
                              ["lora_name", "lora_path", "load_inplace"]),
    "/v1/unload_lora_adapter": ({"lora_name": "nope"}, ["lora_name", "lora_int_id"]),
}
ODD_STRINGS = ["", "a1", BASE, "a2", "user", "text", "x" * 10_000, "\ud800", "\udfff", "\x00", "é", "\u2028",
               "<|im_start|>", "{{ raise_exception('x') }}", "../../etc/passwd", "/etc/passwd", "a1/..", ".",
               "🔑" * 50, "a/b"]
ODD_NUMBERS = [0, 1, -1, 2, 3, 10**30, -(10**30), 2**63, -(2**63) - 1, 2**64, 10**4000, 845, 846,
               float("nan"), float("inf"), float("-inf"), 1e308, -0.0, 5e-324, 1e-300, 0.5, 2.0000001]


def odd_value(rng: random.Random, depth: int = 0):
    """One hostile JSON value: scalars at the edges, odd text, and (shallow) nested lists and objects."""
    kind = rng.randrange(10 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([None, True, False, [], {}, [[]], [{}]])
    if kind in (1, 2):
        return rng.choice(ODD_NUMBERS)
    if kind in (3, 4):
        return rng.choice(ODD_STRINGS)
    if kind == 5:
        return "".join(chr(rng.randrange(0, 0x110000) if rng.random() < 0.3 else rng.randrange(32, 127))
                       for _ in range(rng.randrange(30)))
    if kind == 6:
        return [odd_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 7:
        keys = ["type", "text", "role", "content", "include_usage", "", "\ud800"]
        return {rng.choice(keys): odd_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    if kind == 8:
        return [{"type": rng.choice(["text", "image_url", None]), "text": odd_value(rng, depth + 1)}]
    return [{"role": odd_value(rng, depth + 1), "content": odd_value(rng, depth + 1)}]


def _set(body: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.get(key)
        if not isinstance(node, (dict, list)) or (isinstance(node, list) and not node):
            return  # an earlier rewrite replaced the container
    if isinstance(node, list):
        node[0] = value
    else:
        node[last] = value


def fuzzed_request(rng: random.Random, route: str) -> tuple[bytes, str, bool]:
    """A hostile body for `route`: its raw bytes, the Content-Type sent, and whether it asks to stream."""
    valid, fields = ROUTES[route]
    body = copy.deepcopy(valid)
    for _ in range(rng.randrange(1, 4)):
        field = rng.choice(fields)
        if rng.random() < 0.15 and "." not in field:
            body.pop(field, None)
        else:
            _set(body, field, odd_value(rng))
    if rng.random() < 0.1:
        body[rng.choice(["x", "\ud800", "", "a" * 300])] = odd_value(rng)
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 3 and rng.random() < 0.8:
        body["max_tokens"] = 3  # keep most generations short
    raw = json.dumps(body).encode()  # ASCII: lone surrogates as \ud800; NaN and Infinity as such
    damage = rng.random()
    if damage < 0.04:
        raw = raw[:-1] + b', "model": 5}'  # a duplicate key: the last one wins
    elif damage < 0.07:
        raw = raw[: rng.randrange(len(raw))]
    elif damage < 0.09:
        raw = raw.replace(b'"', b"'", 1)
    elif damage < 0.11:
        raw = raw.replace(b"hi", b"h\xff")  # not UTF-8
    kind = rng.choice(["application/json"] * 8 + ["text/plain", "application/json; charset=utf-8", "",
                                                   "application/vnd.api+json"])
    return raw, kind, body.get("stream") is True


def problems(r, streamed: bool, tmp) -> list[str]:
    """What is wrong with an answer (empty when it is well-formed)."""
    found = []
    if r.status_code >= 500:
        found.append(f"status {r.status_code}")
    if r.status_code != 200:
        error = r.json().get("error") if r.headers["content-type"] == "application/json" else None
        if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
            found.append("no OpenAI error envelope")
    elif streamed and r.headers["content-type"].startswith("text/event-stream"):
        found += sse_problems(r.text)
    if "Traceback" in r.text or str(tmp) in r.text:
        found.append("leaks a traceback or a server path")
    return found


def sse_problems(text: str) -> list[str]:
    """Every event is `data: JSON` (a chunk, or an error in the envelope); the last is `data: [DONE]`."""
    events = text.split("\n\n")
    if events[-2:] != ["data: [DONE]", ""]:
        return ["the stream does not end with data: [DONE]"]
    for event in events[:-2]:
        if not event.startswith("data: "):
            return [f"not an SSE data event: {event[:80]!r}"]
        obj = json.loads(event[len("data: "):])
        if "error" in obj and set(obj["error"]) != {"message", "type", "param", "code"}:
            return ["an error event outside the OpenAI envelope"]
        if "error" not in obj and "choices" not in obj:
            return [f"an event that is neither a chunk nor an error: {event[:80]!r}"]
    return []


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("fuzz"))


def fuzz(served, route: str, seed: int, cases: int) -> None:
    rng = random.Random(seed)
    failures = []
    for i in range(cases):
        raw, kind, streamed = fuzzed_request(rng, route)
        headers = {**AUTH, **({"Content-Type": kind} if kind else {})}
        r = served.client.post(route, content=raw, headers=headers)
        found = problems(r, streamed, served.tmp)
        if found:
            failures.append((found, raw[:300], r.status_code, r.text[:300]))
        if route == "/v1/load_lora_adapter" and r.status_code == 200:  # keep the loaded set as it was
            served.client.post("/v1/unload_lora_adapter", json={"lora_name": json.loads(raw)["lora_name"]},
                               headers=AUTH)
        if "a1" not in served.state.adapters:  # an unload that named it
            assert served.client.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": "a1"},
                                      headers=AUTH).status_code == 200
        if i % 10 == 9:
            assert served.greedy(served.client) == served.baseline
    assert not failures, failures[:5]
    assert served.greedy(served.client) == served.baseline and set(served.state.adapters) == {"a1"}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fuzzed_bodies_get_a_clean_answer_and_the_server_keeps_serving(served, route):
    fuzz(served, route, seed=0, cases=80)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_many_fuzzed_bodies_get_a_clean_answer(served, route, seed):
    fuzz(served, route, seed=seed, cases=700)


# ----- structure: the same hostile bodies on every POST route ------------------------------------

STRUCTURES = {
    "empty": (b"", "application/json", "body: Field required"),
    "null": (b"null", "application/json", "valid dictionary"),
    "array": (b"[1, 2]", "application/json", "valid dictionary"),
    "number": (b"1e999", "application/json", "valid dictionary"),
    "string": (b'"x"', "application/json", "valid dictionary"),
    "truncated": (b'{"model": "a1"', "application/json", "not valid JSON"),
    "trailing_garbage": (b'{"model": "a1"} x', "application/json", "not valid JSON"),
    "two_objects": (b'{"model": "a1"}\n{"model": "a1"}', "application/json", "not valid JSON"),
    "single_quotes": (b"{'model': 'a1'}", "application/json", "not valid JSON"),
    "not_utf8": (b'{"model": "\xff"}', "application/json", "not valid JSON"),
    "deep": (b"[" * 5000 + b"]" * 5000, "application/json", "not valid JSON"),
    "long_number": (b'{"model": 1' + b"0" * 5000 + b"}", "application/json", "4300 digits"),
    "form": (b"model=a1", "application/x-www-form-urlencoded", "Content-Type: application/json"),
    "multipart": (b"--x--", "multipart/form-data; boundary=x", "Content-Type: application/json"),
    "surrogate_field_name": (b'{"model": "a1", "\\ud800": 1}', "application/json",
                             "the field name '\\ud800' is not valid Unicode"),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_a_structurally_broken_body_is_a_400_on_every_route(served, route, name):
    raw, kind, needle = STRUCTURES[name]
    r = served.client.post(route, content=raw, headers={**AUTH, "Content-Type": kind})
    assert r.status_code == 400, r.text[:300]
    assert needle in r.json()["error"]["message"], r.text[:300]
    assert not problems(r, False, served.tmp)
    assert served.greedy(served.client) == served.baseline


def test_a_field_name_that_is_a_lone_surrogate_is_named_where_it_is(served):
    # pydantic's own words were "body: Input should be a valid string, unable to parse raw data as a
    # unicode string": no field, and no hint that a field name was the trouble.
    raw = b'{"model": "a1", "max_tokens": 2, "messages": [{"role": "user", "content": "x", "\\udc00": 1}]}'
    r = served.client.post("/v1/chat/completions", content=raw, headers=JSON_HEADERS)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages", r.text
    assert error["message"] == ("invalid request: messages.0: the field name '\\udc00' is not valid Unicode "
                                "(a lone surrogate)")


# ----- the GET routes, unknown routes and methods ------------------------------------------------

@pytest.mark.parametrize("model_id", ["nope", "a1/", "/a1", "%2e%2e", "..%2F..%2Fetc", "%00", "%ED%A0%80",
                                      "%F0%9F%98%80", "a" * 5000, "%ff"])
def test_models_retrieve_of_an_odd_id_is_a_404_naming_the_model(served, model_id):
    r = served.client.get(f"/v1/models/{model_id}", headers=AUTH)
    assert r.status_code == 404, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == "model" and error["message"].startswith("The model `")
    assert len(r.text) < 1000 and not problems(r, False, served.tmp)


@pytest.mark.parametrize("method, path", [("POST", "/v1/embeddings"), ("GET", "/v1/nothing"),
                                          ("POST", "/v1/responses"), ("GET", "/v1/" + "x" * 5000)])
def test_an_unknown_route_is_a_404_naming_it_and_the_routes_served(served, method, path):
    r = served.client.request(method, path, headers=JSON_HEADERS, content=b"{}")
    assert r.status_code == 404, r.text[:300]
    message = r.json()["error"]["message"]  # was Starlette's bare "Not Found"
    assert message.startswith(f"{method} '{path[:50]}") and "no such route" in message
    assert "/v1/chat/completions" in message and len(message) < 700


@pytest.mark.parametrize("method, path, allowed", [("GET", "/v1/completions", "POST"),
                                                   ("PUT", "/v1/chat/completions", "POST"),
                                                   ("DELETE", "/v1/models/a1", "GET"),
                                                   ("POST", "/v1/models", "GET"),
                                                   ("PATCH", "/health", "GET, HEAD")])
def test_a_wrong_method_is_a_405_naming_the_method_and_the_allowed_one(served, method, path, allowed):
    r = served.client.request(method, path, headers=AUTH)
    assert r.status_code == 405  # and HTTP requires Allow on a 405, here in no set order
    assert set(r.headers["allow"].split(", ")) == set(allowed.split(", "))
    assert r.json()["error"]["message"] == f"{method} '{path}': method not allowed; use {r.headers['allow']}"


@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models", "/v1/models/a1", f"/v1/models/{BASE}"])
def test_the_get_routes_ignore_query_strings_and_bodies(served, path):
    r = served.client.request("GET", path + "?x=%ff&y", headers=JSON_HEADERS, content=b"\xff not json")
    assert r.status_code == 200, r.text[:300]


# ----- sampling values at the edges --------------------------------------------------------------

@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46])
@pytest.mark.parametrize("stream", [False, True])
def test_a_top_p_too_small_for_float32_samples_the_top_token(served, top_p, stream):
    body = {**GREEDY, "temperature": 1.0, "top_p": top_p, "seed": 3, "stream": stream}
    r = served.client.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 200 and not problems(r, stream, served.tmp), r.text[:300]
    if stream:
        events = [json.loads(e[6:]) for e in r.text.split("\n\n")[:-2]]
        text = "".join(e["choices"][0]["text"] for e in events)
    else:
        text = r.json()["choices"][0]["text"]
    assert text == served.baseline  # only the top token is left to sample: greedy's text


@pytest.mark.parametrize("body, field", [
    ({"max_completion_tokens": 5000}, "max_completion_tokens"),
    ({"max_completion_tokens": 5000, "max_tokens": 2}, "max_completion_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),
])
def test_a_completion_budget_over_the_context_names_the_field_that_set_it(served, body, field):
    r = served.client.post("/v1/chat/completions", json={**CHAT, "max_tokens": None, **body}, headers=AUTH)
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded", r.text
    assert error["param"] == field and error["message"].endswith(f"prompt or {field}.")


def test_a_completion_budget_over_the_servers_limit_names_the_field_that_set_it(served):
    r = served.client.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 500}, headers=AUTH)
    error = r.json()["error"]
    assert r.status_code == 413 and error["param"] == "max_completion_tokens", r.text
    assert "500 max_completion_tokens), over this server's limit of 256" in error["message"]


# ----- the official openai client: realistic calls that are wrong -------------------------------

@pytest.fixture(scope="module")
def client(served):
    live = LiveServer(served.app, served.state)
    yield openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)
    live.server.should_exit = True
    live.thread.join(10)


MESSAGES = [{"role": "user", "content": "hi"}]
CHAT_CALLS = {
    "max_tokens_0": ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    "temperature_negative": ({"temperature": -1}, openai.BadRequestError, "temperature"),
    "top_p_0": ({"top_p": 0}, openai.BadRequestError, "top_p"),
    "seed_2_64": ({"seed": 2**64}, openai.BadRequestError, "seed"),
    "n_2": ({"n": 2}, openai.BadRequestError, "n"),
    "logprobs": ({"logprobs": True, "top_logprobs": 2}, openai.BadRequestError, "logprobs"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
              openai.BadRequestError, "tools"),
    "json_mode": ({"response_format": {"type": "json_object"}}, openai.BadRequestError, "response_format"),
    "no_such_model": ({"model": "nope"}, openai.NotFoundError, "model"),
    "stream_no_such_model": ({"model": "nope", "stream": True}, openai.NotFoundError, "model"),
    "stream_n_2": ({"n": 2, "stream": True}, openai.BadRequestError, "n"),
    "tool_role": ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
                  openai.BadRequestError, "messages"),
    "image_part": ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                               "image_url": {"url": "http://x"}}]}]},
                   openai.BadRequestError, "messages"),
    "odd_role": ({"messages": [{"role": "banana", "content": "x"}]}, openai.BadRequestError, "messages"),
    "budget": ({"max_completion_tokens": 100_000}, openai.BadRequestError, "max_completion_tokens"),
}


@pytest.mark.parametrize("name", sorted(CHAT_CALLS))
def test_a_wrong_chat_call_raises_the_openai_exception_for_its_status(client, name):
    kwargs, exception, param = CHAT_CALLS[name]
    kwargs = {"model": "a1", "messages": MESSAGES, "max_tokens": 2, **kwargs}
    with pytest.raises(exception) as info:
        result = client.chat.completions.create(**kwargs)
        list(result) if kwargs.get("stream") else None
    assert info.value.body["param"] == param, info.value.body


@pytest.mark.parametrize("kwargs", [
    {"stop": [""]}, {"seed": 2**64 - 1, "temperature": 1}, {"seed": -(2**63), "temperature": 1},
    {"messages": [{"role": "user", "content": ""}]}, {"user": "u", "metadata": {"k": "v"}, "store": False},
    {"temperature": 1, "top_p": 1e-300, "seed": 1},
])
def test_odd_but_valid_chat_calls_succeed(client, kwargs):
    kwargs = {"model": "a1", "messages": MESSAGES, "max_tokens": 2, **kwargs}
    assert client.chat.completions.create(**kwargs).choices[0].finish_reason in ("length", "stop")
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens <= 2


@pytest.mark.parametrize("kwargs, exception", [
    ({"prompt": ["a", "b"]}, openai.BadRequestError), ({"prompt": [[1, 2], [3]]}, openai.BadRequestError),
    ({"prompt": ""}, openai.BadRequestError), ({"echo": True}, openai.BadRequestError),
    ({"best_of": 3}, openai.BadRequestError), ({"stop": ["s"] * 20}, openai.BadRequestError),
    ({"max_tokens": 500}, openai.APIStatusError),  # 413: over --max-request-tokens
])
def test_a_wrong_completion_call_raises_the_openai_exception_for_its_status(client, kwargs, exception):
    with pytest.raises(exception) as info:
        client.completions.create(**{"model": "a1", "prompt": "hi", "max_tokens": 2, **kwargs})
    assert info.value.status_code in (400, 413)
    assert set(info.value.body) == {"message", "type", "param", "code"}


def test_models_calls_through_the_client(client):
    assert {m.id for m in client.models.list().data} == {BASE, "a1"}
    assert client.models.retrieve("a1").parent == BASE
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("a/b")
    with pytest.raises(openai.APIStatusError) as info:  # the client has models.delete; the server does not
        client.models.delete("a1")
    assert info.value.status_code == 405 and "DELETE '/v1/models/a1'" in info.value.message
    with pytest.raises(openai.NotFoundError, match="no such route"):
        client.embeddings.create(model="a1", input="x")
