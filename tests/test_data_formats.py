"""Golden loss-mask tests for every data format (loratune.data.formats + loratune.data.tokenize).

Goldens are written as token strings of the shipped `preset:tiny-llama` byte-level BPE tokenizer,
trained tokens in [brackets]; Ġ is a leading space and Ċ a newline in byte-level BPE notation.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loratune.data import ALPACA_PROMPT_WITH_INPUT, IGNORE_INDEX, DataConfig, detect_format
from loratune.data.formats import DETECT_ORDER, Columns, RowError, Segment, render_chat, row_segments
from loratune.data.tokenize import SpecialTokens, encode_pretokenized, encode_segments
from loratune.errors import ConfigError
from loratune.tools.generation import chat_ids
from loratune.tools.loading import DEFAULT_MODEL, load_tokenizer

PLAIN_TEMPLATE = (  # writes no BOS and no EOS: the pipeline adds both
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
UNSTABLE_TEMPLATE = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n"
                     "{% endfor %}")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture
def plain_tok():
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    tokenizer.chat_template = PLAIN_TEMPLATE
    return tokenizer


def encode(tok, record, fmt, *, completion_only=True, max_seq_length=512):
    cols = Columns(fmt, dict(DETECT_ORDER)[fmt])
    segs = row_segments(record, cols, tok, completion_only=completion_only)
    return encode_segments([segs], tok, SpecialTokens.of(tok), completion_only=completion_only,
                           max_seq_length=max_seq_length)[0]


def marked(tok, enc) -> str:
    """Tokens as strings, trained ones in [brackets]; checks labels equal ids where trained."""
    assert len(enc.labels) == len(enc.input_ids) and enc.labels[0] == IGNORE_INDEX
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(enc.labels, enc.input_ids))
    toks = tok.convert_ids_to_tokens(enc.input_ids)
    return " ".join(f"[{t}]" if lab != IGNORE_INDEX else t for t, lab in zip(toks, enc.labels))


def test_prompt_completion_golden(tok):
    enc = encode(tok, {"prompt": "What is 2 + 3?\n", "completion": "5"}, "prompt_completion")
    assert marked(tok, enc) == "<s> What Ġis Ġ2 Ġ+ Ġ3 ? Ċ [5] [<|im_end|>]"


def test_text_golden_trains_everything_but_bos(tok):
    enc = encode(tok, {"text": "The capital of France is Paris."}, "text")
    assert marked(tok, enc) == "<s> [The] [Ġcapital] [Ġof] [ĠFrance] [Ġis] [ĠParis] [.] [<|im_end|>]"


def test_alpaca_golden(tok):
    enc = encode(tok, {"instruction": "Reverse the word.", "input": "cat", "output": "tac"}, "alpaca")
    prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction="Reverse the word.", input="cat")
    assert tok.decode(enc.input_ids) == "<s>" + prompt + "tac<|im_end|>"
    assert marked(tok, enc).endswith("### Ġ Re sponse : Ċ [ta] [c] [<|im_end|>]")
    no_input = encode(tok, {"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca")
    assert "Input" not in tok.decode(no_input.input_ids)


def test_messages_multi_turn_golden_trains_every_assistant_turn(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5."},
        {"role": "user", "content": "Reverse cat."},
        {"role": "assistant", "content": "tac."},
    ]
    enc = encode(tok, {"messages": messages}, "messages")
    assert marked(tok, enc) == (
        "<s> <|im_start|> system Ċ B e Ġb ri e f . <|im_end|> Ċ <|im_start|> user Ċ What Ġis Ġ2 Ġ+ Ġ3 ? "
        "<|im_end|> Ċ <|im_start|> assistant Ċ [5] [.] [<|im_end|>] [Ċ] <|im_start|> user Ċ Reverse Ġcat . "
        "<|im_end|> Ċ <|im_start|> assistant Ċ [ta] [c] [.] [<|im_end|>] [Ċ]"
    )
    # the template already ends each turn with EOS (<|im_end|>), so none is appended
    assert enc.input_ids.count(tok.eos_token_id) == 5  # one per message
    # the template writes <s> itself, and the tokenizer would add one too: still exactly one
    assert enc.input_ids.count(tok.bos_token_id) == 1


def test_sharegpt_is_rendered_like_messages(tok):
    share = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    msgs = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert encode(tok, share, "sharegpt") == encode(tok, msgs, "messages")


def test_conversational_prompt_completion_trains_only_the_completion(tok):
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": "bye"}]
    completion = [{"role": "assistant", "content": "ciao"}]
    enc = encode(tok, {"prompt": prompt, "completion": completion}, "prompt_completion")
    as_messages = encode(tok, {"messages": prompt + completion}, "messages")
    assert enc.input_ids == as_messages.input_ids
    trained = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "ciao<|im_end|>\n"
    with pytest.raises(RowError, match="completion has no assistant turn"):
        encode(tok, {"prompt": prompt, "completion": [{"role": "user", "content": "x"}]}, "prompt_completion")


def test_template_without_bos_or_eos_gets_eos_once_and_no_bos(plain_tok):
    """No BOS in front of a template's text, though this tokenizer adds one to plain text: the template
    decides, as with apply_chat_template(tokenize=True), TRL, and the server's chat prompts."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    enc = encode(plain_tok, {"messages": msgs}, "messages")
    # "assistant: " ends with a space that BPE merges into the first answer token: that token
    # overlaps the answer, so it is trained (the model must produce it)
    assert marked(plain_tok, enc) == "user : Ġh i Ċ assistant : [Ġhe] [l] [lo] [Ċ] [<|im_end|>]"
    served = chat_ids(plain_tok, msgs[:1])  # what the server feeds the model for the same turn
    assert served[0] == enc.input_ids[0] != plain_tok.bos_token_id


def test_conversation_ending_with_user_turn_gets_no_eos(plain_tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}]
    enc = encode(plain_tok, {"messages": msgs}, "messages")
    assert plain_tok.eos_token_id not in enc.input_ids
    assert marked(plain_tok, enc).endswith("[Ġhe] [l] [lo] [Ċ] user : Ġb y e Ċ")


def test_text_that_starts_with_bos_keeps_one_bos(tok):
    enc = encode(tok, {"text": "<s>Paris."}, "text")
    assert marked(tok, enc) == "<s> [P] [aris] [.] [<|im_end|>]"
    enc = encode(tok, {"text": "<s><s>Paris."}, "text")
    assert enc.input_ids.count(tok.bos_token_id) == 1


def test_text_already_ending_with_eos_is_not_given_another(tok):
    enc = encode(tok, {"text": "Paris.<|im_end|>\n"}, "text")
    assert enc.input_ids.count(tok.eos_token_id) == 1


def test_completion_only_off_trains_prompt_too(tok):
    enc = encode(tok, {"prompt": "Q?", "completion": "A"}, "prompt_completion", completion_only=False)
    assert marked(tok, enc) == "<s> [Q] [?] [A] [<|im_end|>]"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    enc = encode(tok, {"messages": msgs}, "messages", completion_only=False)
    assert all(lab != IGNORE_INDEX for lab in enc.labels[1:])


def test_truncation_keeps_the_head_and_flags_it(tok):
    enc = encode(tok, {"prompt": "What is 2 + 3?\n", "completion": "5"}, "prompt_completion",
                 max_seq_length=4)
    assert enc.truncated and len(enc.input_ids) == 4 and all(lab == IGNORE_INDEX for lab in enc.labels)
    assert not encode(tok, {"prompt": "Q", "completion": "A"}, "prompt_completion").truncated


def test_slow_tokenizer_path_matches_offsets_path(tok):
    class NoOffsets:  # a tokenizer without offset mapping, as slow tokenizers are
        is_fast = False

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, text, **kw):
            return tok(text, **kw)

    slow = NoOffsets()
    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."}]
    for record, fmt in [({"messages": msgs}, "messages"),
                        ({"prompt": "Q: cat\n", "completion": "tac"}, "prompt_completion")]:
        assert encode(slow, record, fmt) == encode(tok, record, fmt)


def test_unstable_template_is_a_row_error(tok):
    tok2 = load_tokenizer(DEFAULT_MODEL)
    tok2.chat_template = UNSTABLE_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(RowError, match="not prefix-stable at message 1"):
        render_chat(msgs, tok2)


def test_messages_without_chat_template_is_a_config_error(tok):
    tok2 = load_tokenizer(DEFAULT_MODEL)
    tok2.chat_template = None
    with pytest.raises(ConfigError, match="no chat_template"):
        render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tok2)


@pytest.mark.parametrize(
    "record, fmt, message",
    [
        ({"prompt": "Q"}, "prompt_completion", "missing field 'completion'"),
        ({"prompt": "Q", "completion": 5}, "prompt_completion",
         "field 'completion' must be a string, got int"),
        ({"prompt": "Q", "completion": "  "}, "prompt_completion", "field 'completion' is empty"),
        ({"text": ""}, "text", "field 'text' is empty"),
        ({"messages": []}, "messages", "field 'messages' is an empty list"),
        ({"messages": "hi"}, "messages", "must be a list of messages, got str"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "has no assistant turn"),
        ({"messages": [{"role": "user"}]}, "messages", r"messages\[0\] has no 'content'"),
        ({"messages": [{"role": "assistant", "content": ""}]}, "messages", "empty assistant message"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt", "from is 'robot'"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages",
         "role is 'wizard'; expected one of system"),
        ({"instruction": "x", "input": 3, "output": "y"}, "alpaca", "field 'input' must be a string"),
    ],
)
def test_bad_rows_raise_row_error(tok, record, fmt, message):
    with pytest.raises(RowError, match=message):
        row_segments(record, Columns(fmt, dict(DETECT_ORDER)[fmt]), tok)


def test_detect_format_by_columns_and_mapping():
    cfg = DataConfig()
    assert detect_format({"messages", "text"}, cfg).format == "messages"
    assert detect_format({"conversations"}, cfg).names == {"messages": "conversations"}
    assert detect_format({"prompt", "completion", "id"}, cfg).format == "prompt_completion"
    assert detect_format({"instruction", "input", "output"}, cfg).format == "alpaca"
    assert detect_format({"input_ids", "labels"}, cfg).format == "tokenized"
    mapped = detect_format({"question", "answer"},
                           DataConfig(prompt_column="question", completion_column="answer"))
    assert mapped == Columns("prompt_completion", {"prompt": "question", "completion": "answer"})
    assert detect_format({"body"}, DataConfig(text_column="body")).names == {"text": "body"}
    with pytest.raises(ConfigError, match=r"cannot tell the data format from the columns \['a', 'b'\]"):
        detect_format({"a", "b"}, cfg)


def test_pretokenized_rows():
    enc = encode_pretokenized({"input_ids": [5, 6, 7]}, max_seq_length=8)
    assert enc.labels == [IGNORE_INDEX, 6, 7]
    enc = encode_pretokenized({"input_ids": [5, 6, 7], "labels": [5, IGNORE_INDEX, 7]}, max_seq_length=2)
    assert (enc.input_ids, enc.labels, enc.truncated) == ([5, 6], [IGNORE_INDEX, IGNORE_INDEX], True)
    with pytest.raises(RowError, match="'labels' has 2 entries but 'input_ids' has 3"):
        encode_pretokenized({"input_ids": [1, 2, 3], "labels": [1, 2]}, max_seq_length=8)
    with pytest.raises(RowError, match="must be a list of integers"):
        encode_pretokenized({"input_ids": [1, "2"]}, max_seq_length=8)


WORDS = st.text(alphabet="abcdefgh xyz?!\n", min_size=0, max_size=30)


@settings(max_examples=60, deadline=None)
@given(prompt=WORDS, completion=WORDS.filter(lambda s: s.strip()))
def test_prompt_completion_masks_property(tok, prompt, completion):
    """Trained tokens are one suffix that covers the completion plus EOS; nothing else is trained."""
    seg = [Segment(prompt, False), Segment(completion, True)]
    enc = encode_segments([seg], tok, SpecialTokens.of(tok), completion_only=True, max_seq_length=4096)[0]
    assert enc.input_ids[0] == tok.bos_token_id and enc.labels[0] == IGNORE_INDEX
    assert enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids[1:-1]) == prompt + completion
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert all(lab != IGNORE_INDEX for lab in enc.labels[first:])  # one contiguous trained suffix
    trained_text = tok.decode(enc.input_ids[first:-1])
    assert trained_text.endswith(completion) and (prompt + completion).endswith(trained_text)


# A turn that starts with a newline could merge with the template's "assistant\n" into one token,
# which is then (rightly) trained but decodes to more than the turn; keep turns from starting so.
TURN = st.text(alphabet="abcxyz 12+=?.\n", min_size=1, max_size=20).filter(
    lambda s: s.strip() and s[0] != "\n")


@settings(max_examples=40, deadline=None)
@given(turns=st.lists(st.tuples(TURN, TURN), min_size=1, max_size=4), system=st.booleans())
def test_chat_masks_property(tok, turns, system):
    """Trained tokens decode to exactly the assistant turns, each with its <|im_end|>\\n, in order."""
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    enc = encode(tok, {"messages": messages}, "messages")
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    runs, current = [], []
    for i, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            current.append(i)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>\n" for _, a in turns]


TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content or '' }}"
    "{% if m.tool_calls %}<call>{{ m.tool_calls | tojson }}</call>{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
CALL = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]


@pytest.mark.parametrize("tools", [[WEATHER], '[{"type": "function", "function": {"name": "weather", '
                                              '"parameters": {"type": "object"}}}]'])
def test_tools_and_tool_turns_reach_the_template_as_trl_passes_them(tools):
    """A `tools` column (list or JSON string), tool calls, tool results and reasoning are rendered and
    the assistant's calls are trained; before, all of them were dropped without a word."""
    tok = load_tokenizer(DEFAULT_MODEL)
    tok.chat_template = TOOLS_TEMPLATE
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": CALL, "reasoning_content": "look it up"},
                {"role": "tool", "content": "sunny", "name": "weather"},
                {"role": "assistant", "content": "It is sunny."}]
    cols = Columns("messages", {"messages": "messages"})
    segs = row_segments({"messages": messages, "tools": tools}, cols, tok)
    text = "".join(s.text for s in segs)
    assert text.startswith('<tools>[{"type": "function"') and "<|tool|>sunny" in text
    trained = "".join(s.text for s in segs if s.is_completion)
    assert "<think>look it up</think>" in trained and '<call>[{"type": "function"' in trained
    assert "It is sunny." in trained and "<|tool|>" not in trained  # the tool's result is input
    with pytest.raises(RowError, match="'tools' is a string but not JSON"):
        row_segments({"messages": messages, "tools": "[{"}, cols, tok)


def test_pretokenized_rows_with_trls_masks_train_the_masked_tokens():
    for name in ("assistant_masks", "completion_mask"):
        enc = encode_pretokenized({"input_ids": [5, 6, 7, 8], name: [0, 0, 1, 1]}, max_seq_length=8)
        assert enc.labels == [IGNORE_INDEX, IGNORE_INDEX, 7, 8]
        with pytest.raises(RowError, match=f"'{name}' must hold one 0 or 1 per input id"):
            encode_pretokenized({"input_ids": [5, 6, 7], name: [0, 1]}, max_seq_length=8)
    given = encode_pretokenized({"input_ids": [5, 6, 7], "labels": [5, 6, 7], "assistant_masks": [0, 0, 1]},
                                max_seq_length=8)
    assert given.labels == [IGNORE_INDEX, 6, 7]  # labels, when given, win
