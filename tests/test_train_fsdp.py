"""FSDP2 under torchrun (`fsdp: true`): 2 gloo processes follow one process, checkpoints move between
world sizes, the adapter is plain PEFT, and each rank holds only part of the base.

As with DDP (test_train_ddp.py), rank r runs micro-batches r, r+2, ... of the global plan, so 2
processes x 1 micro-batch per step see what 1 process x 2 accumulated micro-batches sees, and
dropout is keyed by the global micro-batch, so the runs agree with lora_dropout > 0 too. They
differ only in the order floating-point sums are taken (the reduce-scatter), hence fp32's tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from loratune.errors import ConfigError
from loratune.train import run
from loratune.train.distributed import DistEnv
from test_cli_train import make_model_dir, rows_for, write_rows
from test_train_loop import adapter, assert_same_adapter, losses, settings
from tolerances import TOL

ATOL, RTOL = TOL[torch.float32]
RUN = {"max_steps": 4, "lora_dropout": 0.1, "per_device_train_batch_size": 2}


def torchrun(config: dict, path, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run `loratune train` under torchrun with `config` written to `path` (YAML, not flags: torchrun's own
    parser would take --r=4 for one of its options)."""
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "loratune.cli.main", "train", str(path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def last_record(out) -> dict:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r][-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with 2 accumulated micro-batches, and 2 sharded processes with 1 each (checkpoint at 2)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    model_dir = make_model_dir(tmp / "model")
    data = write_rows(tmp / "train.jsonl", rows_for("messages", 32))
    evals = {"eval_steps": 2, "eval_file": data, "eval_metric": "exact_match", "eval_max_new_tokens": 4}
    single = tmp / "single"
    run(settings(model_dir, data, single, gradient_accumulation_steps=2, **RUN, **evals))
    sharded = tmp / "sharded"
    done = torchrun(settings(model_dir, data, sharded, fsdp=True, save_steps=2, **RUN, **evals),
                    tmp / "sharded.yaml")
    return {"tmp": tmp, "model_dir": model_dir, "data": data, "single": single, "sharded": sharded,
            "stdout": done.stdout}


def test_two_sharded_processes_follow_one_process_with_the_same_global_batch(runs):
    single, sharded = runs["single"], runs["sharded"]
    assert losses(sharded) == pytest.approx(losses(single), rel=RTOL)
    assert_same_adapter(adapter(single), adapter(sharded), atol=ATOL)
    assert runs["stdout"].count("Adapter:") == 1  # only rank 0 reports
    records = [json.loads(line) for line in (sharded / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    scored = [(r["step"], r["eval_exact_match"]) for r in records if "eval_loss" in r]
    expected = [(r["step"], r["eval_exact_match"]) for r in map(json.loads, open(single / "metrics.jsonl"))
                if "eval_loss" in r]
    assert scored == expected and len(scored) == 2  # every rank generated, every row counted once
    assert len(last_record(sharded)["peak_rss_mib"]) == 2  # one per rank
    checkpoint = sharded / "checkpoint-2"
    assert sorted(os.listdir(checkpoint / "distributed")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert (checkpoint / "adapter_model.safetensors").exists()  # gathered: loadable as is


def _resume_copy(runs, name: str, source, step: int = 2):
    """A fresh output_dir holding `source`'s checkpoint-<step> and metrics, as a run killed there leaves."""
    out = runs["tmp"] / name
    out.mkdir()
    shutil.copytree(source / f"checkpoint-{step}", out / f"checkpoint-{step}")
    shutil.copy(source / "metrics.jsonl", out / "metrics.jsonl")
    return out


def test_sharded_processes_cut_into_unequal_passes_stay_in_step(tmp_path):
    """A token budget cuts each rank's micro-batch into a different number of passes; every rank still
    runs as many forwards (FSDP gathers in each) and the run follows one process's."""
    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", 32))
    tight = {**RUN, "lora_dropout": 0.0, "max_tokens_per_batch": 40}
    run(settings(model_dir, data, tmp_path / "single", gradient_accumulation_steps=2, **tight))
    torchrun(settings(model_dir, data, tmp_path / "sharded", fsdp=True, **tight), tmp_path / "sharded.yaml")
    assert losses(tmp_path / "sharded") == pytest.approx(losses(tmp_path / "single"), rel=1e-4)
    assert_same_adapter(adapter(tmp_path / "single"), adapter(tmp_path / "sharded"), atol=1e-5)


def test_a_checkpoint_of_two_sharded_processes_resumes_in_one_unsharded_process(runs):
    out = _resume_copy(runs, "two_to_one", runs["sharded"])
    result = run(settings(runs["model_dir"], runs["data"], out, gradient_accumulation_steps=2,
                          resume_from_checkpoint=True, **RUN))
    assert result.start_step == 2
    assert_same_adapter(adapter(runs["single"]), adapter(out), atol=ATOL)
    assert losses(out) == pytest.approx(losses(runs["single"]), rel=RTOL)


def test_a_checkpoint_of_one_process_resumes_in_two_sharded_ones_with_gradient_checkpointing(runs):
    """One process with fsdp: true shards nothing but writes the sharded format; two processes
    continue it (and recompute activations in backward, which changes nothing)."""
    first = runs["tmp"] / "one_process"
    run(settings(runs["model_dir"], runs["data"], first, fsdp=True, gradient_accumulation_steps=2,
                 save_steps=2, **RUN))
    assert (first / "checkpoint-2" / "distributed" / ".metadata").exists()
    out = _resume_copy(runs, "one_to_two", first)
    torchrun(settings(runs["model_dir"], runs["data"], out, fsdp=True, gradient_checkpointing=True,
                      resume_from_checkpoint=True, **RUN), runs["tmp"] / "one_to_two.yaml")
    assert_same_adapter(adapter(runs["single"]), adapter(out), atol=ATOL)
    assert losses(out) == pytest.approx(losses(runs["single"]), rel=RTOL)


def test_a_ddp_format_checkpoint_resumes_in_two_sharded_processes(runs):
    """A checkpoint holding whole weights and optimizer (one process or DDP wrote it) is sharded on load."""
    first = runs["tmp"] / "unsharded"
    run(settings(runs["model_dir"], runs["data"], first, gradient_accumulation_steps=2, save_steps=2, **RUN))
    assert not (first / "checkpoint-2" / "distributed").exists()
    out = _resume_copy(runs, "full_to_sharded", first)
    torchrun(settings(runs["model_dir"], runs["data"], out, fsdp=True, resume_from_checkpoint=True, **RUN),
             runs["tmp"] / "full_to_sharded.yaml")
    assert_same_adapter(adapter(runs["single"]), adapter(out), atol=ATOL)


@pytest.mark.parity
def test_the_adapter_of_a_sharded_run_loads_in_peft_with_loratunes_logits(runs):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from factories import tiny_batch
    from loratune import PeftModel as LoratunePeftModel

    def load_base():
        return AutoModelForCausalLM.from_pretrained(runs["model_dir"], dtype=torch.float32).eval()

    ids = tiny_batch(2, 12) + 4  # clear of the special-token ids
    with torch.no_grad():
        base = load_base()(ids).logits
        ours = LoratunePeftModel.from_pretrained(load_base(), str(runs["sharded"])).eval()(ids).logits
        theirs = peft.PeftModel.from_pretrained(load_base(), str(runs["sharded"])).eval()(ids).logits
    assert (ours - base).abs().max() > 1e-3  # training moved the model: the comparison means something
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("quantization", [{"load_in_4bit": True, "bnb_4bit_use_double_quant": True},
                                          {"load_in_8bit": True}], ids=["nf4-double-quant", "int8"])
def test_a_quantized_base_is_sharded_and_trains_as_on_one_process(runs, quantization, tmp_path):
    """Each rank quantizes one dense weight at a time and keeps its rows of the codes and scales."""
    kw = {**RUN, **quantization, "bnb_4bit_compute_dtype": "float32"}
    single = tmp_path / "single"
    run(settings(runs["model_dir"], runs["data"], single, gradient_accumulation_steps=2, **kw))
    sharded = tmp_path / "sharded"
    torchrun(settings(runs["model_dir"], runs["data"], sharded, fsdp=True, **kw), tmp_path / "sharded.yaml")
    assert losses(sharded) == pytest.approx(losses(single), rel=RTOL)
    assert_same_adapter(adapter(single), adapter(sharded), atol=ATOL)


def test_quantized_storage_becomes_frozen_parameters_fsdp_can_shard(runs):
    from loratune.quant import quantize_model, quantized_layers
    from loratune.tools.loading import load_base_model
    from loratune.train.fsdp import quantized_storage_as_parameters

    model = quantize_model(load_base_model(runs["model_dir"], dtype="float32"), bits=4, double_quant=True)
    keys = set(model.state_dict())
    quantized_storage_as_parameters(model)
    _, layer = quantized_layers(model)[0]
    assert isinstance(layer.qweight, torch.nn.Parameter) and not layer.qweight.requires_grad
    assert "absmax_offset" in layer._buffers  # a scalar: FSDP2 shards along dim 0, so it stays a buffer
    assert set(model.state_dict()) == keys


@pytest.mark.slow
def test_each_rank_holds_less_memory_than_one_process_when_the_base_dominates(tmp_path):
    """A base of ~250 MB in wide MLPs over 20 layers: each of 2 sharded ranks loads and keeps half of it
    (plus one gathered layer at a time), so its peak RSS stays well below one process's."""
    model_dir = make_model_dir(tmp_path / "model", intermediate_size=16384, num_hidden_layers=20)
    base_mib = sum(f.stat().st_size for f in (tmp_path / "model").glob("*.safetensors")) / 2**20
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", 8))
    kw = {"max_steps": 2, "per_device_train_batch_size": 1, "target_modules": ["q_proj", "v_proj"],
          "max_seq_length": 32}
    torchrun(settings(model_dir, data, tmp_path / "one", gradient_accumulation_steps=2, **kw),
             tmp_path / "one.yaml", nproc=1)
    torchrun(settings(model_dir, data, tmp_path / "two", fsdp=True, **kw), tmp_path / "two.yaml")
    (one,) = last_record(tmp_path / "one")["peak_rss_mib"]
    two = last_record(tmp_path / "two")["peak_rss_mib"]
    assert len(two) == 2 and max(two) < one - base_mib / 4, (one, two, base_mib)


def test_cpu_offload_without_a_gpu_is_refused_by_name(runs):
    from loratune.tools.loading import load_base_model
    from loratune.train.fsdp import shard_model

    model = load_base_model(runs["model_dir"], dtype="float32")
    with pytest.raises(ConfigError, match="fsdp_cpu_offload"):
        shard_model(model, DistEnv(), cpu_offload=True, reshard_after_forward=True)


def test_a_model_without_known_decoder_layers_is_refused_by_name():
    from loratune.train.fsdp import decoder_layers

    with pytest.raises(ConfigError, match="cannot find the decoder layers of Sequential"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.gpu
def test_one_gpu_sharded_run_follows_an_unsharded_one(tmp_path):
    """NCCL with one process: the sharded path (meta loading, fully_shard, sharded checkpoint) on CUDA."""
    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", 32))
    plain = tmp_path / "plain"
    run(settings(model_dir, data, plain, gradient_accumulation_steps=2, **RUN))
    sharded = tmp_path / "sharded"
    torchrun(settings(model_dir, data, sharded, fsdp=True, gradient_accumulation_steps=2, save_steps=2,
                      **RUN), tmp_path / "sharded.yaml", nproc=1)
    assert (sharded / "checkpoint-2" / "distributed" / ".metadata").exists()
    assert losses(sharded) == pytest.approx(losses(plain), rel=RTOL)
    assert_same_adapter(adapter(plain), adapter(sharded), atol=ATOL)
