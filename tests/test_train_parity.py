"""An adapter trained by `loratune train` loads in `peft` and gives loratune's logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from factories import tiny_batch
from loratune import PeftModel as LoratunePeftModel
from test_cli_train import base_flags, make_model_dir, rows_for, train_cli, write_rows

peft = pytest.importorskip("peft")


@pytest.mark.parity
def test_cli_trained_adapter_loads_in_peft_with_identical_logits(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("alpaca"))
    out = tmp_path / "run"
    rc = train_cli([*base_flags(model_dir, data, out), "--max_steps", "3", "--save_steps", "0",
                    "--max_seq_length", "128", "--use_rslora", "true"])
    assert rc == 0
    ids = tiny_batch(2, 12) + 4  # clear of the special-token ids

    def load_base():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    with torch.no_grad():
        base_logits = load_base()(ids).logits
        ours = LoratunePeftModel.from_pretrained(load_base(), str(out)).eval()(ids).logits
        theirs = peft.PeftModel.from_pretrained(load_base(), str(out)).eval()(ids).logits
    assert (ours - base_logits).abs().max() > 1e-3  # training moved the model: the comparison means something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
