"""Measure the CPU speed levers one at a time, each against its plain alternative.

    python bench/levers.py [--threads 1]

Each figure is the minimum over repeats of per-thread CPU time (time.thread_time) at a fixed thread
count, which stays stable on a machine shared with other jobs where wall-clock time does not. The
results are written up in docs/performance.md.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch
import torch.nn.functional as F

D, FF, V, N, R, LAYERS = 576, 1536, 49152, 1024, 16, 30


def best_ms(fn, repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return 1e3 * min(times)


def lora_params() -> list[torch.Tensor]:
    """The 7 x 30 A/B pairs of the benchmark model (fp32), with gradients."""
    shapes = [(D, D), (D, 192), (D, 192), (D, D), (D, FF), (D, FF), (FF, D)]
    params = []
    for _ in range(LAYERS):
        for d_in, d_out in shapes:
            for shape in ((R, d_in), (d_out, R)):
                p = torch.nn.Parameter(torch.randn(shape) * 0.01)
                p.grad = torch.randn(shape) * 1e-6
                params.append(p)
    return params


def adamw(kind: str, flush: bool, tiny_grads: bool) -> float:
    """One AdamW step over the LoRA parameters after 50 steps (second moments near denormal)."""
    torch.set_flush_denormal(False)
    params = lora_params()
    if tiny_grads:  # what late training looks like: grad^2 ~ 1e-40 lands in the denormal range
        for p in params:
            p.grad.mul_(1e-14)
    kwargs = {"plain": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[kind]
    opt = torch.optim.AdamW(params, lr=1e-4, **kwargs)
    for _ in range(3):
        opt.step()
    torch.set_flush_denormal(flush)
    ms = best_ms(opt.step, repeats=5)
    torch.set_flush_denormal(False)
    return ms


def rms_norm_variants() -> dict[str, float]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(D).to(torch.bfloat16)
    norm.weight.requires_grad_(False)
    x = torch.randn(N, D, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(N, D, dtype=torch.bfloat16)
    out = {"HF LlamaRMSNorm": best_ms(lambda: norm(x).backward(g))}
    out["F.rms_norm"] = best_ms(lambda: F.rms_norm(x, (D,), norm.weight, 1e-6).backward(g))
    try:
        compiled = torch.compile(norm)
        out["torch.compile(LlamaRMSNorm)"] = best_ms(lambda: compiled(x).backward(g), warmup=3)
    except Exception as exc:  # no compiler toolchain
        out["torch.compile(LlamaRMSNorm)"] = float("nan")
        print("torch.compile unavailable:", type(exc).__name__, exc)
    return out


def swiglu_variants() -> dict[str, float]:
    gate = torch.randn(N, FF, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(N, FF, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(N, FF, dtype=torch.bfloat16)

    def eager():
        (F.silu(gate) * up).backward(g)

    out = {"eager silu(gate) * up": best_ms(eager)}
    try:
        fn = torch.compile(lambda a, b: F.silu(a) * b)
        out["torch.compile"] = best_ms(lambda: fn(gate, up).backward(g), warmup=3)
    except Exception as exc:
        out["torch.compile"] = float("nan")
        print("torch.compile unavailable:", type(exc).__name__, exc)
    return out


def attention_variants(length: int) -> dict[str, float]:
    """Causal attention of one example (9 heads / 3 KV heads of 64, bf16), fwd + bwd."""
    from loratune.ops.attention import packed_causal_attention

    heads, kv, dim = 9, 3, 64
    # Transformers' layout
    q = (2 * torch.randn(length, heads, dim)).bfloat16().transpose(0, 1).requires_grad_()
    k = (2 * torch.randn(kv, length, dim)).bfloat16().requires_grad_()
    v = torch.randn(kv, length, dim).bfloat16().requires_grad_()
    g = torch.randn(length, heads, dim).bfloat16()

    def sdpa(dtype):
        def run():
            out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True,
                                                 enable_gqa=True)
            out.to(q.dtype).transpose(0, 1).backward(g)
        return run

    out = {"sdpa flash, bf16": best_ms(sdpa(torch.bfloat16)),
           "sdpa flash, fp32 casts": best_ms(sdpa(torch.float32))}
    for block in (64, 128, 256):
        out[f"blocked bmm kernel, block {block}"] = best_ms(
            lambda b=block: packed_causal_attention(q, k, v, [(0, length)], dim ** -0.5, block=b).backward(g))
    return out


def big_alloc(trim: bool) -> float:
    """Allocate and fill a (N x V) fp32 buffer, as the unchunked loss does every step."""
    if trim:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2**30)  # M_MMAP_THRESHOLD: keep big blocks on the heap
        libc.mallopt(-1, 2**31)  # M_TRIM_THRESHOLD: do not hand them back to the OS
    return best_ms(lambda: torch.zeros(N, V))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}; ms of thread CPU time, best of repeats")
    for tiny in (False, True):
        for kind in ("plain", "foreach", "fused"):
            for flush in (False, True):
                print(f"AdamW {kind:8s} flush_denormal={flush!s:5s} denormal-range state={tiny!s:5s}: "
                      f"{adamw(kind, flush, tiny):8.1f}")
    for name, ms in rms_norm_variants().items():
        print(f"RMSNorm fwd+bwd (1024 x 576 bf16) {name}: {ms:.2f}")
    for name, ms in swiglu_variants().items():
        print(f"SwiGLU fwd+bwd (1024 x 1536 bf16) {name}: {ms:.2f}")
    for length in (128, 256, 512):
        for name, ms in attention_variants(length).items():
            print(f"causal attention fwd+bwd, T={length}, {name}: {ms:.2f}")
    print(f"zeros(1024 x 49152) fp32, glibc defaults: {big_alloc(False):.1f}")
    print(f"zeros(1024 x 49152) fp32, mmap/trim thresholds raised: {big_alloc(True):.1f}")


if __name__ == "__main__":
    main()
