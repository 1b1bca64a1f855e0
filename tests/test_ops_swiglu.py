"""The SwiGLU node and the fused Llama MLP against the module's own forward, and what backward keeps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from factories import tiny_batch, tiny_model
from loratune import LoraConfig, get_peft_model
from loratune.layers.linear import LoraLinear
from loratune.ops import reference_paths
from loratune.ops.swiglu import enable_fused_mlp, is_llama_mlp, swiglu
from loratune.quant import quantize_model

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The compiled kernels compute silu(g) * u without rounding silu(g) to bf16 first, and fuse the
# backward: within a bf16 ulp of plain autograd; fp32 within a few fp32 ulps. Eager is bit for bit.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


@pytest.fixture
def eager_kernels(monkeypatch):
    import loratune.ops.compiled as compiled

    monkeypatch.setitem(compiled._STATE, "enabled", False)


def lora_model(arch="llama", dtype=torch.float32, dropout=0.0, bits=None, **overrides):
    """A tiny model with LoRA on all seven projections (on a `bits`-bit quantized base if given) and
    non-zero lora_B, so every path carries gradient."""
    base = tiny_model(arch, dtype=dtype, **overrides)
    if bits is not None:
        base = quantize_model(base, bits=bits, compute_dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                            target_modules=PROJECTIONS))
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model


def loss_and_grads(model, batch, seed=0):
    torch.manual_seed(seed)  # the same dropout masks for both runs: the same modules draw in the same order
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, graph_nodes(loss)


def graph_nodes(loss) -> list:
    """Every autograd node behind `loss`."""
    seen, stack = {}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            stack.extend(n for n, _ in node.next_functions)
    return list(seen.values())


def swiglu_nodes(loss) -> int:
    return sum(type(node).__name__ == "_SwigluFnBackward" for node in graph_nodes(loss))


def saved_activation_bytes(loss, model) -> tuple[int, int]:
    """(bytes of distinct non-parameter storages the graph keeps for backward, how many saved tensors
    are kept as something other than a tensor). Walked from the graph, not counted with
    saved_tensors_hooks: under an outer hook the fused MLP runs the module's own forward."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen, total, records = set(), 0, 0
    for node in graph_nodes(loss):
        for name in dir(node):
            if not name.startswith("_raw_saved_"):
                continue
            value = getattr(node, name)
            for saved in value if isinstance(value, (list, tuple)) else [value]:
                data = None if saved is None else saved.data  # what pack returned, or the tensor itself
                if data is None:
                    continue
                if not isinstance(data, torch.Tensor):
                    records += 1
                    continue
                ptr = data.untyped_storage().data_ptr()
                if ptr not in skip and ptr not in seen:
                    seen.add(ptr)
                    total += data.untyped_storage().nbytes()
    return total, records


# ----- the node ---------------------------------------------------------------------------------


def ulp_close(actual, expected, scale=None, ulps=1):
    """|actual - expected| within `ulps` units in the last place of `scale` (default: of expected)."""
    scale = expected if scale is None else scale
    finfo = torch.finfo(expected.dtype)
    step = ulps * finfo.eps * scale.abs().float().clamp_min(finfo.tiny)
    assert ((actual.float() - expected.float()).abs() <= step).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", ["eager", "compiled"])
@pytest.mark.parametrize("shape", [(2, 7, 48), (1, 37, 1001)])
def test_swiglu_matches_plain_autograd(dtype, kernels, shape, request):
    import loratune.ops.compiled as compiled
    import loratune.ops.swiglu as module

    if kernels == "eager":
        request.getfixturevalue("eager_kernels")
    gen = torch.Generator().manual_seed(0)
    g0, u0, grad = ((3 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(3))
    results = []
    for fn in (swiglu, lambda g, u: F.silu(g) * u):
        g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
        h = fn(g, u)
        h.backward(grad)
        results.append((h.detach(), g.grad, u.grad))
    (h, grad_g, grad_u), (ref_h, ref_grad_g, ref_grad_u) = results
    for got, want in zip(results[0], results[1]):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert not torch.equal(h, u0)  # not vacuous
    if kernels == "eager":  # the same ops in the same order
        assert torch.equal(h, ref_h) and torch.equal(grad_g, ref_grad_g) and torch.equal(grad_u, ref_grad_u)
        return
    assert compiled.enabled() and module._forward_kernel.proven and module._backward_kernel.proven
    ulp_close(h, ref_h)
    ulp_close(grad_u, ref_grad_u)
    if dtype == torch.bfloat16:
        ulp_close(grad_g, ref_grad_g)
    else:  # silu's slope crosses zero near g = -1.28: measured against what it multiplies
        ulp_close(grad_g, ref_grad_g, scale=grad * u0, ulps=4)


def test_backward_reads_the_forwards_h_bit_for_bit():
    import loratune.ops.swiglu as module

    g, u = (torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(s)).bfloat16() for s in (1, 2))
    h = swiglu(g.requires_grad_(), u)
    pack = module._pack_as_recompute(h, g, u)
    view = h.view(-1, 48)[3:]  # what a consumer may save: a reshaped slice
    record = pack(view)
    assert isinstance(record, module._Recompute) and record.g is g and record.u is u
    assert torch.equal(module._unpack(record), view)
    other = torch.ones(3)
    assert pack(other) is other and module._unpack(other) is other
    h.detach().mul_(2)  # written in place: the recompute would be wrong, so h itself is kept
    assert pack(view) is view


def test_swiglu_returns_only_the_gradients_asked_for():
    g, u = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    swiglu(g, u).sum().backward()
    torch.testing.assert_close(g.grad, torch.autograd.grad((F.silu(g) * u).sum(), g)[0], **TOL[torch.float32])
    assert u.grad is None


# ----- the switched model -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("kernels", ["eager", "compiled"])
def test_fused_mlp_trains_like_the_module_forward(dtype, dropout, kernels, request):
    if kernels == "eager":
        request.getfixturevalue("eager_kernels")
    batch = tiny_batch(2, 9)
    runs = []
    for switch in (True, False):
        model = lora_model(dtype=dtype, dropout=dropout).train()
        if switch:
            assert enable_fused_mlp(model) == model.get_base_model().config.num_hidden_layers
        runs.append(loss_and_grads(model, batch))
    (loss, grads, nodes), (ref_loss, ref_grads, ref_nodes) = runs
    assert sum(type(n).__name__ == "_SwigluFnBackward" for n in nodes) == 2  # the fused path ran
    assert not any(type(n).__name__ == "_SwigluFnBackward" for n in ref_nodes)
    assert grads.keys() == ref_grads.keys() and any("down_proj.lora_A" in n for n in grads)
    check = torch.equal if kernels == "eager" else lambda a, b: torch.allclose(a, b, **TOL[dtype])
    assert check(loss, ref_loss), (loss, ref_loss)
    for name in ref_grads:
        assert ref_grads[name].abs().max() > 0, name  # every adapter carries gradient
        assert check(grads[name], ref_grads[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_with_unfused_lora_layers_trains_like_the_module_forward(dtype, monkeypatch):
    """down_proj on LoraLinear's reference path (base linear plus a separate low-rank branch)."""
    monkeypatch.setattr(LoraLinear, "_fused_adapter", lambda self, args, kwargs: None)
    batch = tiny_batch(2, 9)
    runs = []
    for switch in (True, False):
        model = lora_model(dtype=dtype, dropout=0.1).train()
        if switch:
            enable_fused_mlp(model)
        runs.append(loss_and_grads(model, batch))
    (loss, grads, nodes), (ref_loss, ref_grads, _) = runs
    assert not any(type(n).__name__ == "_LoraLinearFnBackward" for n in nodes)
    assert sum(type(n).__name__ == "_SwigluFnBackward" for n in nodes) == 2
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL[dtype], msg=name)


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_mlp_on_a_quantized_base_trains_like_the_module_forward(bits, eager_kernels):
    batch = tiny_batch(2, 9)
    runs = []
    for switch in (True, False):
        model = lora_model(bits=bits).train()
        if switch:
            assert enable_fused_mlp(model) == 2
        runs.append(loss_and_grads(model, batch))
    (loss, grads, nodes), (ref_loss, ref_grads, _) = runs
    assert sum(type(n).__name__ == "_SwigluFnBackward" for n in nodes) == 2
    assert torch.equal(loss, ref_loss)
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_fused_mlp_keeps_two_fewer_intermediate_tensors_per_layer():
    batch = tiny_batch(2, 16)
    saved = {}
    for switch in (True, False):
        model = lora_model().train()
        if switch:
            enable_fused_mlp(model)
        loss = model(input_ids=batch, labels=batch).loss
        saved[switch] = saved_activation_bytes(loss, model)
    cfg = model.get_base_model().config
    intermediate = batch.numel() * cfg.intermediate_size * 4  # one (B, T, I) fp32 tensor
    (fused, records), (ref, ref_records) = saved[True], saved[False]
    # silu(g) and h are gone; g and u stay, and h is kept as a record pointing at them
    assert ref - fused == 2 * intermediate * cfg.num_hidden_layers
    assert records - ref_records == cfg.num_hidden_layers


def test_nothing_keeps_h_alive_after_the_forward():
    import weakref

    alive = {}
    for switch in (True, False):
        model = lora_model().train()
        if switch:
            enable_fused_mlp(model)
        refs = []

        def remember(module, args, refs=refs):
            refs.append(weakref.ref(args[0]))

        for name, mlp in model.named_modules():
            if name.endswith(".mlp"):  # h is what down_proj is called with, on both paths
                mlp.down_proj.register_forward_pre_hook(remember)
        batch = tiny_batch(2, 9)
        loss = model(input_ids=batch, labels=batch).loss
        alive[switch] = [ref() is not None for ref in refs]
        loss.backward()
    assert alive == {True: [False, False], False: [True, True]}  # the reference keeps it for down_proj


# ----- when it stays off ------------------------------------------------------------------------------


def test_reference_paths_and_no_grad_run_the_module_forward(monkeypatch):
    import loratune.ops.swiglu as module

    calls = []
    monkeypatch.setattr(module, "swiglu", lambda g, u: calls.append(1) or swiglu(g, u))
    model = lora_model()
    enable_fused_mlp(model)
    batch = tiny_batch(2, 9)
    with reference_paths():
        assert swiglu_nodes(model(input_ids=batch, labels=batch).loss) == 0
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    assert calls == []
    model(input_ids=batch, labels=batch).loss.backward()
    assert calls == [1, 1]  # not vacuous: with grad the fused path runs
    with torch.no_grad(), reference_paths():
        assert torch.equal(logits, model(input_ids=batch).logits)


def test_outer_saved_tensor_hooks_run_the_module_forward():
    """Saved-tensor hooks stack; ours would hide an outer pair (checkpointing's, save_on_cpu's)."""
    model = lora_model()
    enable_fused_mlp(model)
    batch = tiny_batch(2, 9)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert swiglu_nodes(model(input_ids=batch, labels=batch).loss) == 0
    assert swiglu_nodes(model(input_ids=batch, labels=batch).loss) == 2


def _checkpoint(model):
    base = model.get_base_model()
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def test_gradient_checkpointed_models_are_not_switched():
    model = lora_model()
    _checkpoint(model)
    assert enable_fused_mlp(model) == 0
    assert not any("forward" in vars(m) for m in model.modules() if is_llama_mlp(m))


def test_checkpointing_turned_on_after_switching_trains_like_the_module_forward():
    batch = tiny_batch(2, 9)
    runs = []
    for switch in (True, False):
        model = lora_model().train()
        if switch:
            assert enable_fused_mlp(model) == 2
        _checkpoint(model)
        runs.append(loss_and_grads(model, batch))
    (loss, grads, nodes), (ref_loss, ref_grads, _) = runs
    assert not any(type(n).__name__ == "_SwigluFnBackward" for n in nodes)
    assert torch.equal(loss, ref_loss)
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_only_silu_mlps_with_llamas_forward_are_switched_and_only_once():
    assert enable_fused_mlp(lora_model(hidden_act="gelu")) == 0
    qwen2 = lora_model("qwen2")
    assert enable_fused_mlp(qwen2) == 2  # Qwen2MLP: another class, the same forward
    assert enable_fused_mlp(qwen2) == 0

    class SwappedMLP(nn.Module):  # the same parts, another computation
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    assert not is_llama_mlp(SwappedMLP())
    assert enable_fused_mlp(SwappedMLP()) == 0


_KERNEL_CHECK = """
import os, torch
from loratune.ops import swiglu
torch.manual_seed(0)
g, u = torch.randn(64, 96), torch.randn(64, 96)
h = swiglu._forward_kernel(g, u)
assert swiglu._forward_kernel.proven, "the compiled kernel did not run"
assert (h - swiglu._forward_math(g, u)).abs().max() < 1e-5, "wrong values"
print(os.environ["TORCHINDUCTOR_CACHE_DIR"])
"""


@pytest.mark.slow  # two cold compiles, ~40 s
def test_a_kernel_cached_without_an_isa_cap_is_not_reused_under_one(tmp_path):
    """Inductor's disk cache mixes kernels built with and without ATEN_CPU_CAPABILITY (wrong values)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    env.update(TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", LORATUNE_COMPILE="1")
    dirs = []
    for cap in (None, "avx2"):
        run_env = dict(env, **({"ATEN_CPU_CAPABILITY": cap} if cap else {}))
        done = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=run_env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        dirs.append(done.stdout.strip().splitlines()[-1])
    assert dirs[1] == dirs[0] + "-avx2"


@pytest.mark.parametrize(("dtype", "switched"), [(torch.float32, True), (torch.bfloat16, False)])
def test_the_trainer_fuses_mlps_of_a_float32_base_only(dtype, switched):
    """Measured on SmolLM2: worth it in float32, a net loss in bf16 (train.build.adapt_base)."""
    from loratune.train.build import adapt_base
    from loratune.train.config import build_config

    cfg = build_config({"train_file": "x.jsonl"})
    model = adapt_base(tiny_model().to(dtype), cfg, torch.device("cpu"))
    mlps = [m for m in model.modules() if is_llama_mlp(m)]
    assert mlps and all(("forward" in vars(m)) is switched for m in mlps)
