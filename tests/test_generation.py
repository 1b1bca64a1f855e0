"""Generation helpers: greedy == argmax loop, seeded sampling is reproducible, chat keeps history."""

from __future__ import annotations

import re

import pytest
import torch

from loratune.errors import ConfigError
from loratune.tools.generation import (
    ChatSession,
    GenerationSettings,
    chat_ids,
    check_utf8,
    generate_batch_ids,
    generate_ids,
    generate_text,
    prompt_ids,
    stop_token_ids,
)
from loratune.tools.loading import load_base_model, load_tokenizer
from test_load_trained import save_tiny_model_dir


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    path = save_tiny_model_dir(tmp_path_factory.mktemp("base"))
    return load_base_model(path, dtype="float32"), load_tokenizer(path)


def test_settings_are_validated_together():
    with pytest.raises(ConfigError) as err:
        GenerationSettings(max_new_tokens=0, temperature=-1, top_p=0)
    assert len(err.value.problems) == 3
    assert GenerationSettings().greedy and not GenerationSettings(temperature=0.7).greedy


@pytest.mark.parametrize(("settings", "message"), [
    ({"seed": -1}, "--seed must be an integer from 0 to 18446744073709551615"),
    ({"seed": 99999999999999999999999}, "--seed must be an integer from 0"),
    ({"temperature": float("nan")}, "--temperature must be >= 0 and finite"),
    ({"temperature": float("inf")}, "--temperature must be >= 0 and finite"),
    ({"top_p": float("nan")}, "--top_p must be in (0, 1]"),
    ({"top_p": float("inf")}, "--top_p must be in (0, 1]"),
])
def test_out_of_range_and_non_finite_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        GenerationSettings(**settings)
    GenerationSettings(temperature=1.0, seed=0)
    GenerationSettings(temperature=1.0, seed=2**64 - 1)


def test_seed_at_the_top_of_the_range_samples(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = prompt_ids(tok, "Once upon a time")
    assert len(generate_ids(model, tok, ids,
                            GenerationSettings(max_new_tokens=2, temperature=1.0, seed=2**64 - 1)))


def test_text_that_is_not_utf8_is_a_config_error(model_and_tokenizer):
    _, tok = model_and_tokenizer
    not_utf8 = b"caf\xe9".decode("utf-8", "surrogateescape")  # what argv and stdin hold for such bytes
    with pytest.raises(ConfigError,
                       match=re.escape("the prompt is not valid UTF-8 (byte(s) 0xe9 at character 3)")):
        prompt_ids(tok, not_utf8)
    with pytest.raises(ConfigError, match=re.escape("message 2 (user) is not valid UTF-8")):
        chat_ids(tok, [{"role": "system", "content": "hi"}, {"role": "user", "content": not_utf8}])
    with pytest.raises(ConfigError, match="^--prompt is not valid UTF-8"):
        check_utf8(not_utf8, "--prompt")
    check_utf8("café ✓", "--prompt")


def test_greedy_equals_an_argmax_loop(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = prompt_ids(tok, "Hello there")
    assert ids[0] == tok.bos_token_id
    new = generate_ids(model, tok, ids, GenerationSettings(max_new_tokens=6))
    seq = list(ids)
    with torch.no_grad():
        for _ in range(len(new)):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[len(ids):] == new
    assert 0 < len(new) <= 6


@pytest.mark.parametrize("adapter", [False, True])
def test_batched_greedy_equals_one_prompt_at_a_time(model_and_tokenizer, adapter, tmp_path):
    model, tok = model_and_tokenizer
    if adapter:  # LoRA rows go through the same left-padded batch
        from loratune.tools.load_trained import load_model
        from test_load_trained import save_tiny_adapter, save_tiny_model_dir

        base = save_tiny_model_dir(tmp_path / "base")
        loaded = load_model(adapter=save_tiny_adapter(tmp_path / "a", base, scale=0.3), dtype="float32")
        model, tok = loaded.model, loaded.tokenizer
    texts = ("Hi", "Once upon a time there was", "2+2=", "The quick brown fox")
    prompts = [prompt_ids(tok, p) for p in texts]
    prompts.append(chat_ids(tok, [{"role": "user", "content": "hello"}]))
    assert len({len(p) for p in prompts}) == len(prompts)  # every row is padded differently
    settings = GenerationSettings(max_new_tokens=8)
    one_by_one = [generate_ids(model, tok, ids, settings) for ids in prompts]
    assert generate_batch_ids(model, tok, prompts, settings) == one_by_one
    assert generate_batch_ids(model, tok, prompts[::-1], settings) == one_by_one[::-1]
    assert len({tuple(new) for new in one_by_one}) > 1 and all(one_by_one)  # not vacuous


def test_a_batch_cuts_each_row_at_its_own_stop(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [prompt_ids(tok, "Hello there"), prompt_ids(tok, "A much longer prompt than that")]
    first = generate_ids(model, tok, prompts[0], GenerationSettings(max_new_tokens=6))
    assert len(first) >= 2
    stop = first[1]  # make the first row's second token a stop token
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop
    try:
        batch = generate_batch_ids(model, tok, prompts, GenerationSettings(max_new_tokens=6))
    finally:
        model.generation_config.eos_token_id = original
    assert batch[0] == first[:1]
    assert stop not in batch[0] and len(batch[1]) >= 1


def test_sampling_is_reproducible_by_seed(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = prompt_ids(tok, "Once upon a time")
    hot = GenerationSettings(max_new_tokens=12, temperature=1.5, seed=1)
    first = generate_ids(model, tok, ids, hot)
    state = torch.random.get_rng_state()
    assert generate_ids(model, tok, ids, hot) == first
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    others = {tuple(generate_ids(model, tok, ids,
                                 GenerationSettings(max_new_tokens=12, temperature=1.5, seed=s)))
              for s in (2, 3)}
    assert any(o != tuple(first) for o in others)


def test_stop_tokens_end_generation_and_are_not_returned(model_and_tokenizer):
    model, tok = model_and_tokenizer
    stops = stop_token_ids(model, tok)
    assert tok.eos_token_id in stops
    ids = prompt_ids(tok, "Hi")
    new = generate_ids(model, tok, ids, GenerationSettings(max_new_tokens=20))
    assert not set(new) & set(stops)


def test_training_samples_stop_where_generate_stops(model_and_tokenizer, monkeypatch):
    """Training samples and the server use stop_token_ids too, so a generation-config-only stop token
    (like Llama 3's <|eot_id|>) ends them as it ends `loratune generate`."""
    import copy

    from loratune.train.sampling import sample_completion

    model, tok = model_and_tokenizer
    model = copy.deepcopy(model)
    ids = prompt_ids(tok, "Hi")
    free = generate_ids(model, tok, ids, GenerationSettings(max_new_tokens=12))
    stop = free[3]  # make a token the model does emit a stop token, via the generation config only
    assert stop != tok.eos_token_id and stop not in free[:3]
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    model.config.eos_token_id = tok.eos_token_id
    assert stop in stop_token_ids(model, tok)
    expected = tok.decode(free[:3], skip_special_tokens=True).strip()
    assert sample_completion(model, tok, ids, max_new_tokens=12) == expected


def test_chat_template_renders_one_bos_and_the_assistant_header(model_and_tokenizer):
    _, tok = model_and_tokenizer
    ids = chat_ids(tok, [{"role": "user", "content": "hi"}])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_chat_without_template_is_a_config_error(model_and_tokenizer):
    _, tok = model_and_tokenizer
    template, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(ConfigError, match="chat_template"):
            chat_ids(tok, [{"role": "user", "content": "hi"}])
    finally:
        tok.chat_template = template


def test_chat_session_keeps_history_and_resets(model_and_tokenizer):
    model, tok = model_and_tokenizer
    session = ChatSession(model, tok, GenerationSettings(max_new_tokens=4), system="Be brief.")
    first = session.reply("hello")
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant"]
    assert session.history[-1]["content"] == first
    expected = generate_text(model, tok,
                             chat_ids(tok, session.messages() + [{"role": "user", "content": "again"}]),
                             session.settings)
    assert session.reply("again") == expected  # the second answer sees the first turn
    session.reset()
    assert session.history == [] and session.messages() == [{"role": "system", "content": "Be brief."}]


def test_streamed_pieces_join_to_the_final_text(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = prompt_ids(tok, "Stream this")
    settings = GenerationSettings(max_new_tokens=24, temperature=1.5, seed=0)
    pieces: list[str] = []
    text = generate_text(model, tok, ids, settings, on_text=pieces.append)
    assert "".join(pieces) == text == generate_text(model, tok, ids, settings)
    assert len(pieces) > 1 and all(pieces)


def test_a_tiny_temperature_is_greedy_as_in_the_server():
    from loratune.serve.sampling import SamplingParams
    from loratune.tools.generation import GREEDY_BELOW, GenerationSettings

    for t in (0.0, 1e-30, GREEDY_BELOW / 2):
        assert GenerationSettings(temperature=t).greedy and SamplingParams(temperature=t).greedy
    assert not GenerationSettings(temperature=GREEDY_BELOW).greedy
    assert not SamplingParams(temperature=0.5).greedy
