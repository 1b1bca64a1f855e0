"""PEFT's README example runs unchanged with only the import line swapped to loratune."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from factories import tiny_batch, tiny_model
from tolerances import assert_changed, assert_close

PEFT_IMPORT = "from peft import LoraConfig, TaskType, get_peft_model"
SNIPPET = f"""
from transformers import AutoModelForCausalLM
{PEFT_IMPORT}

model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
peft_config = LoraConfig(
    r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, task_type=TaskType.CAUSAL_LM
)
model = get_peft_model(model, peft_config)
model.print_trainable_parameters()
outputs = model(input_ids=input_ids)
"""


def run(snippet: str, model_dir: str, input_ids: torch.Tensor):
    namespace = {"model_name_or_path": model_dir, "input_ids": input_ids}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "<readme>", "exec"), namespace)
    return namespace["model"], namespace["outputs"], printed.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(str(path))
    return str(path)


def test_only_the_import_line_changes(model_dir):
    ours_snippet = SNIPPET.replace(PEFT_IMPORT, "from loratune import LoraConfig, TaskType, get_peft_model")
    assert ours_snippet.count("\n") == SNIPPET.count("\n") and ours_snippet != SNIPPET
    x = tiny_batch()
    ours, ours_out, ours_print = run(ours_snippet, model_dir, x)
    import loratune

    assert isinstance(ours, loratune.LoraModel)
    pytest.importorskip("peft")
    theirs, theirs_out, theirs_print = run(SNIPPET, model_dir, x)
    assert ours_print == theirs_print and ours_print.startswith("trainable params: ")
    assert torch.equal(ours_out.logits, theirs_out.logits)  # both fresh: exactly the base model
    # Same adapter weights -> same outputs (PEFT's parameter names carry one extra "base_model." prefix).
    g = torch.Generator().manual_seed(0)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                theirs_params[f"base_model.{name}"].copy_(p)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        ours_logits, theirs_logits = ours(input_ids=x).logits, theirs(input_ids=x).logits
    assert_changed(ours_logits, ours_out.logits)
    assert_close(ours_logits, theirs_logits)
