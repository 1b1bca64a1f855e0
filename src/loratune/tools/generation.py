"""Text generation for the `generate` and `chat` verbs: prompts in, new text out.

Greedy decoding is the default (temperature 0); a temperature > 0 samples, optionally with
nucleus (top_p) filtering, from a seeded generator so a given seed always gives the same text.
Prompts are either plain text (the tokenizer adds BOS as it normally does) or chat messages
rendered with the tokenizer's own chat template (which writes its own BOS, so none is added).
`generate_batch_ids` decodes several prompts together (left padding, one forward per step for the
batch, KV cache); a single prompt is a batch of one, so there is one decoding path.
Nothing here prints; `ChatSession` keeps the conversation history for the interactive loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationConfig

from loratune.errors import ConfigError

MAX_SEED = 2**64 - 1  # the largest seed torch.manual_seed accepts
# Temperatures below this decode greedily (as vLLM does): dividing logits by a tinier one overflows.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: greedy when temperature is 0 (or below GREEDY_BELOW), else sampling."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # Messages name the `generate`/`chat` flags, the only way users set these.
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"--temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            problems.append(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            # torch.manual_seed overflows past 2**64 - 1 and maps a negative seed onto a positive one
            problems.append(f"--seed must be an integer from 0 to {MAX_SEED} (2**64 - 1), got {self.seed}")
        if problems:
            raise ConfigError(problems)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def check_utf8(text: str, what: str) -> None:
    """Refuse text holding lone surrogates: bytes that were not UTF-8, kept by Python as U+DC80..U+DCFF.

    argv and stdin decode undecodable bytes that way (surrogateescape); tokenizers cannot encode them.

    Raises:
        ConfigError: naming `what` ("--prompt", "input line 3") and the first bad byte.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start:exc.end]
        try:
            shown = "byte(s) " + " ".join(f"0x{b:02x}" for b in bad.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:  # a surrogate that did not come from a byte
            shown = f"character {bad!r}"
        raise ConfigError(f"{what} is not valid UTF-8 ({shown} at character {exc.start}); "
                          "save or type the text as UTF-8") from None


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Tokenize a plain-text prompt the way the tokenizer normally does (BOS included if it adds one).

    Raises:
        ConfigError: the prompt is empty or not valid UTF-8.
    """
    if not prompt:
        raise ConfigError("the prompt is empty")
    check_utf8(prompt, "the prompt")
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Render messages with the chat template, ending with the assistant's turn header.

    Raises:
        ConfigError: the tokenizer has no chat template; a message is not valid UTF-8.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this tokenizer has no chat_template, so chat prompts cannot be rendered; "
                          "use a chat model's tokenizer or a plain --prompt")
    for i, message in enumerate(messages, 1):
        check_utf8(message["content"], f"message {i} ({message['role']})")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """EOS ids of the tokenizer, the model's generation config and its config (some models have several).

    The one list of stop tokens for `loratune generate`/`chat`, training samples and the server.
    """
    ids = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    in_config = getattr(getattr(model, "config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured, in_config):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


class TextStream:
    """Hands decoded text to `on_text` as tokens arrive (the `streamer` protocol of `generate`).

    The whole continuation is decoded each time and only the new suffix is passed on, held back
    while it ends in a partial UTF-8 character, so the pieces join to exactly the final text.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None], stops: list[int]) -> None:
        self.tokenizer, self.on_text, self.stops = tokenizer, on_text, set(stops)
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids += [i for i in value.reshape(-1).tolist() if i not in self.stops]
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, *, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent and (final or not text.endswith("\ufffd")):
            self.on_text(text[self.sent:])
            self.sent = len(text)


def generate_ids(model: nn.Module, tokenizer, ids: list[int], settings: GenerationSettings,
                 on_text: Callable[[str], None] | None = None) -> list[int]:
    """Return only the newly generated token ids for one prompt (stop tokens excluded).

    With `on_text`, the text is also handed over piece by piece while it is generated.
    """
    return generate_batch_ids(model, tokenizer, [ids], settings, on_text=on_text)[0]


@torch.no_grad()
def generate_batch_ids(model: nn.Module, tokenizer, batch: list[list[int]], settings: GenerationSettings,
                       *, on_text: Callable[[str], None] | None = None) -> list[list[int]]:
    """Return the new token ids of every prompt in `batch`, decoded together, each cut at its first stop.

    The prompts are left-padded to one (B, T) tensor with an attention mask, so each step is one
    forward for all rows over the KV cache; a row that stops early waits (padded) for the others.
    Greedy rows come out as one-at-a-time generation gives them (tested); sampled rows draw from
    one generator, so a row's text depends on its batch. `on_text` streams a batch of one only.
    """
    if not batch or any(not ids for ids in batch):
        raise ValueError("generate_batch_ids needs at least one prompt and no empty one")
    if on_text is not None and len(batch) != 1:
        raise ValueError(f"on_text streams one prompt at a time, got a batch of {len(batch)}")
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, T), left padding
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=not settings.greedy,
        temperature=settings.temperature if not settings.greedy else None,
        top_p=settings.top_p if not settings.greedy else None,
        top_k=None,
        eos_token_id=stops or None,
        pad_token_id=pad,
        use_cache=True,
    )
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        streamer = TextStream(tokenizer, on_text, stops) if on_text is not None else None
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config, streamer=streamer)
    return [_until_stop(row, stops) for row in out[:, width:].tolist()]


def _until_stop(new: list[int], stops: list[int]) -> list[int]:
    """The tokens before the first stop token (after it come only the padding of finished rows)."""
    for i, token in enumerate(new):
        if token in stops:
            return new[:i]
    return new


def generate_text(model: nn.Module, tokenizer, ids: list[int], settings: GenerationSettings,
                  on_text: Callable[[str], None] | None = None) -> str:
    """Decode the continuation of `ids` as text (special tokens dropped); stream it to `on_text`."""
    return tokenizer.decode(generate_ids(model, tokenizer, ids, settings, on_text), skip_special_tokens=True)


@dataclass
class ChatSession:
    """A conversation: each user turn is answered with the whole history as context."""

    model: nn.Module
    tokenizer: object
    settings: GenerationSettings
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.history.clear()

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add the user's turn, generate the assistant's answer, remember both, return the answer."""
        self.history.append({"role": "user", "content": user_text})
        try:
            answer = generate_text(self.model, self.tokenizer, chat_ids(self.tokenizer, self.messages()),
                                   self.settings, on_text)
        except BaseException:
            self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": answer})
        return answer
