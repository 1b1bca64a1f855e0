"""Detect a dataset's format from its columns and turn each row into text segments.

A row becomes a list of `Segment(text, is_completion)`; concatenated, the segments are exactly the
text the model sees, and the `is_completion` ones are what it learns to produce:

  text               [text*]
  prompt_completion  [prompt, completion*]; or, when both are message lists (TRL's conversational
                     form), the conversation rendered like messages with only the completion's
                     assistant turns trained
  alpaca             [Alpaca prompt with instruction (+ input), output*]
  messages           the tokenizer's chat template, split at each assistant turn (see `render_chat`);
                     a `tools` column goes to the template too, and a message's other keys
                     (`tool_calls`, `reasoning_content`, `name`, ...) reach it as they are
  sharegpt           `conversations` from/value turns mapped to roles, then as messages
  tokenized          `input_ids` (+ optional `labels`) used as they are, no segments

Chat masks are found by rendering prefixes: the text before assistant turn i is the template
applied to messages[:i] with add_generation_prompt=True, and the turn ends where the template of
messages[:i+1] ends. This needs no knowledge of the template, so any chat template works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from loratune.errors import ConfigError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
TOOLS_COLUMN = "tools"  # TRL's name: tool schemas for the chat template, a list or a JSON string
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}
# Auto-detection order: the first format whose columns are all present wins.
DETECT_ORDER = (
    ("tokenized", {"input_ids": "input_ids"}),
    ("messages", {"messages": "messages"}),
    ("sharegpt", {"messages": "conversations"}),
    ("prompt_completion", {"prompt": "prompt", "completion": "completion"}),
    ("alpaca", {"instruction": "instruction", "output": "output"}),
    ("text", {"text": "text"}),
)


# Formats whose rows hold a prompt and a separate answer (what exact-match evaluation scores).
ANSWER_FORMATS = ("prompt_completion", "alpaca", "messages", "sharegpt")


class RowError(ValueError):
    """A problem with one row; `build_datasets` prefixes it with the row's file and line."""


@dataclass(frozen=True)
class Segment:
    text: str
    is_completion: bool
    templated: bool = False  # rendered by a chat template, which decides about BOS itself


@dataclass(frozen=True)
class Columns:
    """The detected format and which column plays each part ({"prompt": "question", ...})."""

    format: str
    names: dict[str, str]


def detect_format(columns: set[str], cfg, first_turn_keys: set[str] | None = None) -> Columns:
    """Pick the row format from the column names and the config's column mapping.

    first_turn_keys: the keys of the first turn of a `conversations` column, if any: role/content
    turns there are messages, from/value turns ShareGPT.

    Raises:
        ConfigError: no known format fits; the message lists the columns and the mapping fields.
    """
    if cfg.text_column:
        return Columns("text", {"text": cfg.text_column})
    if cfg.prompt_column or cfg.completion_column:
        return Columns("prompt_completion", {"prompt": cfg.prompt_column or "prompt",
                                             "completion": cfg.completion_column or "completion"})
    if cfg.messages_column:
        fmt = cfg.dataset_format if cfg.dataset_format in ("messages", "sharegpt") else "messages"
        return Columns(fmt, {"messages": cfg.messages_column})
    if cfg.dataset_format != "auto":
        return Columns(cfg.dataset_format, _default_names(cfg.dataset_format))
    for fmt, names in DETECT_ORDER:
        if set(names.values()) <= columns:
            if fmt == "sharegpt" and first_turn_keys and {"role", "content"} <= first_turn_keys:
                return Columns("messages", dict(names))  # the hub's role/content turns under that name
            return Columns(fmt, dict(names))
    raise ConfigError(
        f"cannot tell the data format from the columns {sorted(columns)}; expected one of: text; "
        "prompt + completion; messages; conversations; instruction + output (alpaca); input_ids. "
        "Map your columns with text_column, prompt_column/completion_column or messages_column"
    )


def first_turn_keys(records) -> set[str] | None:
    """The keys of the first turn of the first `conversations` list among `records`, for
    `detect_format`; None when there is none."""
    for record in records:
        turns = record.get("conversations")
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return set(turns[0])
    return None


def _default_names(fmt: str) -> dict[str, str]:
    return next(names for f, names in DETECT_ORDER if f == fmt)


def _string(record: dict[str, Any], column: str, *, allow_empty: bool = False) -> str:
    if column not in record or record[column] is None:
        raise RowError(f"missing field {column!r}")
    value = record[column]
    if not isinstance(value, str):
        raise RowError(f"field {column!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"field {column!r} is empty")
    return _unicode(value, f"field {column!r}")


def _unicode(value: str, name: str) -> str:
    """Return `value`, or raise RowError if it holds a lone surrogate (a JSON escape such as "\\ud800"
    without its pair), which is not text: tokenizers refuse it with a TypeError that names nothing."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(f"{name} holds a lone surrogate {value[exc.start]!r} at character {exc.start}, which "
                       "is not valid Unicode (an unpaired \\ud800-\\udfff escape)") from None
    return value


def row_segments(record: dict[str, Any], cols: Columns, tokenizer, *,
                 completion_only: bool = True) -> list[Segment]:
    """Turn one row into segments (see the module docstring). Raises RowError for a bad row.

    With `completion_only` False a conversation is one completion segment (every token trains),
    so templates that are not prefix-stable still work.
    """
    names, fmt = cols.names, cols.format
    if fmt == "text":
        return [Segment(_string(record, names["text"]), True)]
    if fmt == "prompt_completion":
        if isinstance(record.get(names["prompt"]), list):
            return _conversational_prompt_completion(record, names, tokenizer, completion_only)
        prompt = _string(record, names["prompt"], allow_empty=True)
        return [Segment(prompt, False), Segment(_string(record, names["completion"]), True)]
    if fmt == "alpaca":
        instruction = _string(record, names["instruction"])
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RowError(f"field 'input' must be a string, got {type(extra).__name__}")
        if extra:
            _unicode(extra, "field 'input'")
        template = ALPACA_PROMPT_WITH_INPUT if extra and extra.strip() else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=extra)
        return [Segment(prompt, False), Segment(_string(record, names["output"]), True)]
    if fmt in ("messages", "sharegpt"):
        messages = _messages(record, names["messages"], sharegpt=fmt == "sharegpt")
        return _chat_segments(messages, tokenizer, completion_only, tools=_tools(record))
    raise AssertionError(f"row_segments called for format {fmt!r}")


def is_templated(record: dict[str, Any], cols: Columns) -> bool:
    """True when the row's text comes from the chat template (conversations, TRL's conversational
    prompt/completion)."""
    return cols.format in ("messages", "sharegpt") or (
        cols.format == "prompt_completion" and isinstance(record.get(cols.names["prompt"]), list))


def _tools(record: dict[str, Any]) -> list | None:
    """The row's tool schemas for the chat template, as TRL passes them (a list, or a JSON string)."""
    tools = record.get(TOOLS_COLUMN)
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise RowError(f"field {TOOLS_COLUMN!r} is a string but not JSON ({exc.msg} at character "
                           f"{exc.pos})") from None
    if hasattr(tools, "tolist"):  # numpy arrays from parquet
        tools = tools.tolist()
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError(f"field {TOOLS_COLUMN!r} must be a list of tool schemas (objects)")
    return tools or None


def prompt_and_answer(record: dict[str, Any], cols: Columns, tokenizer) -> tuple[str, str, str]:
    """Split one row into (prompt text, expected answer, question) for exact-match evaluation.

    The prompt is exactly the text the model saw in training before the answer: a string prompt as
    it is (training applies no chat template to it), the Alpaca template, or, for conversations, the
    chat template of the turns before the last assistant turn with add_generation_prompt=True. The
    answer is the completion, the Alpaca output, or the last assistant turn's content. The question
    is the row's own words, for showing: the prompt, the instruction (+ input), or the turn before
    the answer.

    Raises:
        ConfigError: the tokenizer has no chat template (conversations).
        RowError: a missing or malformed field, or a conversation with no turn before its answer.
    """
    names, fmt = cols.names, cols.format
    if fmt == "prompt_completion" and not isinstance(record.get(names["prompt"]), list):
        prompt = _string(record, names["prompt"], allow_empty=True)
        return prompt, _string(record, names["completion"]), prompt
    if fmt == "alpaca":
        prompt, output = row_segments(record, cols, tokenizer)
        question = "\n".join(str(record[k]) for k in (names["instruction"], "input") if record.get(k))
        return prompt.text, output.text, question
    if fmt == "prompt_completion":
        messages = (_messages(record, names["prompt"], sharegpt=False, need_assistant=False)
                    + _messages(record, names["completion"], sharegpt=False))
    elif fmt in ("messages", "sharegpt"):
        messages = _messages(record, names["messages"], sharegpt=fmt == "sharegpt")
    else:
        raise AssertionError(f"prompt_and_answer called for format {fmt!r}, not one of {ANSWER_FORMATS}")
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last == 0:
        raise RowError("the conversation starts with its answer (the last assistant turn); "
                       "exact match needs a turn before it to use as the prompt")
    _require_template(tokenizer)
    prompt = _apply(tokenizer, messages[:last], add_generation_prompt=True, tools=_tools(record))
    return prompt, messages[last]["content"] or "", messages[last - 1]["content"] or ""


def _conversational_prompt_completion(record, names, tokenizer, completion_only) -> list[Segment]:
    """TRL's conversational prompt/completion: both are message lists; only the completion trains."""
    prompt = _messages(record, names["prompt"], sharegpt=False, need_assistant=False)
    completion = _messages(record, names["completion"], sharegpt=False)
    return _chat_segments(prompt + completion, tokenizer, completion_only, first_trained=len(prompt),
                          tools=_tools(record))


def _chat_segments(messages, tokenizer, completion_only: bool, first_trained: int = 0,
                   tools: list | None = None) -> list[Segment]:
    if completion_only:
        return render_chat(messages, tokenizer, first_trained=first_trained, tools=tools)
    _require_template(tokenizer)
    return [Segment(_apply(tokenizer, messages, add_generation_prompt=False, tools=tools), True, True)]


def _messages(record: dict[str, Any], column: str, *, sharegpt: bool,
              need_assistant: bool = True) -> list[dict[str, str]]:
    if column not in record or record[column] is None:
        raise RowError(f"missing field {column!r}")
    turns = record[column]
    if not isinstance(turns, list):
        raise RowError(f"field {column!r} must be a list of messages, got {type(turns).__name__}")
    if not turns:
        raise RowError(f"field {column!r} is an empty list")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"{column}[{i}] must be an object with {role_key!r} and {content_key!r}")
        # an assistant turn that only calls tools may have no content (OpenAI's form)
        calls = not sharegpt and bool(_present(turn.get("tool_calls")))
        for key in (role_key, content_key):
            if key == content_key and calls and turn.get(key) is None:
                continue
            if key not in turn or turn[key] is None:
                raise RowError(f"{column}[{i}] has no {key!r}")
            if not isinstance(turn[key], str):
                raise RowError(f"{column}[{i}].{key} must be a string, got {type(turn[key]).__name__}")
        role = turn[role_key]
        if sharegpt:
            if role not in SHAREGPT_ROLES:
                raise RowError(f"{column}[{i}].from is {role!r}; expected one of {sorted(SHAREGPT_ROLES)}")
            role = SHAREGPT_ROLES[role]
        elif role not in MESSAGE_ROLES:
            raise RowError(f"{column}[{i}].role is {role!r}; expected one of {', '.join(MESSAGE_ROLES)}")
        content = turn.get(content_key)
        if role == "assistant" and not calls and not content.strip():
            raise RowError(f"{column}[{i}] is an empty assistant message")
        if content is not None:
            content = _unicode(content, f"{column}[{i}].{content_key}")
        # the other keys (tool_calls, tool_call_id, name, reasoning_content, ...) reach the template
        extra = {} if sharegpt else {k: v for k, v in ((k, _present(v)) for k, v in turn.items()
                                                      if k not in (role_key, content_key)) if v is not None}
        messages.append({"role": role, "content": content, **extra})
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise RowError(f"{column} has no assistant turn, so there is nothing to train on")
    return messages


def _present(value: Any) -> Any:
    """A message field as the template should see it: numpy arrays (parquet) as lists; None, and the
    empty values a columnar file fills in for keys other rows have, as absent."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return None if value is None or (isinstance(value, (list, dict, str)) and not value) else value


def render_chat(messages: list[dict[str, Any]], tokenizer, *, first_trained: int = 0,
                tools: list | None = None) -> list[Segment]:
    """Render with the tokenizer's chat template; assistant turns become completion segments.

    Only assistant turns at index >= `first_trained` are completions (all of them by default).

    Raises:
        ConfigError: the tokenizer has no chat template.
        RowError: the template fails on this row, or is not prefix-stable (rendering fewer messages
            does not give a prefix of the full text), so turns cannot be located.
    """
    _require_template(tokenizer)
    full = _apply(tokenizer, messages, add_generation_prompt=False, tools=tools)
    segments, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_trained:
            continue
        start = len(_apply(tokenizer, messages[:i], add_generation_prompt=True, expect_prefix_of=full,
                           turn=i, tools=tools))
        end = len(_apply(tokenizer, messages[: i + 1], add_generation_prompt=False, expect_prefix_of=full,
                         turn=i, tools=tools))
        if start < cursor or end < start:
            raise RowError(f"chat template is not prefix-stable at message {i}; "
                           "cannot locate the assistant turn")
        segments += [Segment(full[cursor:start], False, True), Segment(full[start:end], True, True)]
        cursor = end
    segments.append(Segment(full[cursor:], False, True))
    return [s for s in segments if s.text]


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the data has messages but the tokenizer has no chat_template; use a chat model's "
                          "tokenizer or give the data as prompt/completion")


def _apply(tokenizer, messages, *, add_generation_prompt: bool, expect_prefix_of: str | None = None,
           turn: int = 0, tools: list | None = None) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, tools=tools,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja's TemplateError, and anything a template's raise_exception() throws
        raise RowError(f"chat template failed: {exc}") from exc
    if expect_prefix_of is not None and not expect_prefix_of.startswith(text):
        raise RowError(f"chat template is not prefix-stable at message {turn}: rendering the first messages "
                       "does not give a prefix of the whole conversation, so turns cannot be located; "
                       "set completion_only_loss: false to train on every token")
    return text
