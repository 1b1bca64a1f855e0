"""Ollama Modelfiles and llama.cpp command lines for exported GGUF files.

Ollama writes chat templates in Go's text/template, not Jinja. A Jinja template is converted only
when it is recognised by what it renders: ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`, as in
SmolLM2, Qwen and the tiny preset), optionally with a BOS in front and a default system message
(which becomes the Modelfile's SYSTEM line). Anything else is left out, and the Modelfile says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CHATML_GO_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}{{- end }}<|im_start|>assistant\n"
)
_PROBE_SYSTEM, _PROBE_USER, _PROBE_ASSISTANT = "S-1", "U-2", "A-3"


@dataclass(frozen=True)
class OllamaTemplate:
    """A converted chat template: the Go TEMPLATE, a default SYSTEM message and stop strings; or, with
    `template` None, why it could not be converted."""

    template: str | None
    system: str | None = None
    stop: tuple[str, ...] = ()
    reason: str | None = None


def _chatml(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def convert_chat_template(tokenizer) -> OllamaTemplate:
    """Convert the tokenizer's chat template to Ollama's Go syntax when it renders as ChatML."""
    if not getattr(tokenizer, "chat_template", None):
        return OllamaTemplate(None, reason="the tokenizer has no chat template")

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    user, reply = {"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}
    try:
        with_system = render([{"role": "system", "content": _PROBE_SYSTEM}, user, reply, user])
        without = render([user])
    except Exception as exc:  # a template that fails on plain messages cannot be recognised
        return OllamaTemplate(None, reason=f"rendering the chat template failed: {exc}")
    bos = getattr(tokenizer, "bos_token", None) or ""
    turn = _chatml("user", _PROBE_USER)
    tail = "<|im_start|>assistant\n"
    full = _chatml("system", _PROBE_SYSTEM) + turn + _chatml("assistant", _PROBE_ASSISTANT) + turn + tail
    prefix = next((p for p in ("", bos) if with_system == p + full), None)
    if prefix is None:
        return OllamaTemplate(None, reason="the chat template is not ChatML (<|im_start|>role ... "
                                           "<|im_end|>); write the Modelfile's TEMPLATE by hand")
    body = without.removeprefix(prefix)
    system = None
    if body != turn + tail:
        head = "<|im_start|>system\n"
        default, sep, rest = body.removeprefix(head).partition("<|im_end|>\n")
        if not body.startswith(head) or not sep or rest != turn + tail:
            return OllamaTemplate(None, reason="the chat template adds text that Ollama's ChatML template "
                                               "would not")
        system = default
    return OllamaTemplate(CHATML_GO_TEMPLATE, system=system, stop=("<|im_end|>",))


def modelfile(base_gguf: str, template: OllamaTemplate, *, adapter_gguf: str | None = None) -> str:
    """The text of an Ollama Modelfile: FROM the model, ADAPTER the adapter, TEMPLATE/SYSTEM/stop."""
    lines = [f"FROM {base_gguf}"]
    if adapter_gguf:
        lines.append(f"ADAPTER {adapter_gguf}")
    if template.template is None:
        lines.append(f"# No TEMPLATE: {template.reason}.")
    else:
        lines.append(f'TEMPLATE """{template.template}"""')
        if template.system is not None:
            lines.append(f'SYSTEM """{template.system}"""')
        lines += [f'PARAMETER stop "{s}"' for s in template.stop]
    return "\n".join(lines) + "\n"


def llama_cpp_commands(model_gguf: str, adapter_gguf: str | None = None) -> list[str]:
    """llama-cli (chat) and llama-server command lines for a model, with the adapter when given."""
    lora = f" --lora {_quote(adapter_gguf)}" if adapter_gguf else ""
    model = _quote(model_gguf)
    return [f"llama-cli -m {model}{lora}", f"llama-server -m {model}{lora} --port 8080"]


def _quote(path: str) -> str:
    import shlex

    return shlex.quote(os.fspath(path))
