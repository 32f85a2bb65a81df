"""Attention within samples on one GPU: which PyTorch kernel ``sdpa_varlen`` should run for packed rows.

Why: a packed or padding-free row of ``T`` tokens holding samples of lengths ``l_1..l_n`` needs causal attention
within each sample only. PyTorch offers several ways to compute it; this script times each on the same rows
(forward + backward, bf16) and checks each against a float32 per-sample reference, so the choice in
`llavakit.model.attention` is measured rather than assumed:

    sdpa per sample   one causal SDPA call per sample (flash backend), the CPU path of sdpa_varlen
    varlen_attn       torch.nn.attention.varlen.varlen_attn: one flash varlen call over all samples
    sdpa + mask       one SDPA call over the row with a [T, T] block-diagonal causal mask (transformers' sdpa path)
    flex document     FlexAttention with a document-causal block mask (compiled), block mask built once per row

Shapes: Vicuna-7B attention (32 heads of 128) and Qwen2.5-0.5B (14 query heads, 2 key/value heads, 64 dims);
rows of ``--row`` tokens filled with LLaVA-NeXT-like sample lengths (image samples ~700-2900 tokens, text ~100-600).

Run: ``python benchmarks/gpu_attention.py [--row 8192] [--rows 2]``; ``--smoke`` runs tiny shapes on the CPU.
It prints, never asserts.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = {"vicuna-7b": (32, 32, 128), "qwen2.5-0.5b": (14, 2, 64)}


def sample_lengths(row: int, rng: random.Random) -> list[int]:
    """Sample lengths filling one row exactly: mostly image samples, some text-only ones, the last one cut."""
    lengths: list[int] = []
    while sum(lengths) < row:
        length = rng.randint(700, 2900) if rng.random() < 0.8 else rng.randint(100, 600)
        lengths.append(min(length, row - sum(lengths)))
    return lengths


def per_sample(q, k, v, lengths, groups):
    """``[1, H, T, D]`` inputs -> ``[1, H, T, D]``; one causal SDPA call per sample."""
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    parts = zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
    return torch.cat([F.scaled_dot_product_attention(a, b, c, is_causal=True) for a, b, c in parts], dim=2)


def masked(q, k, v, lengths, groups):
    """One SDPA call with a boolean block-diagonal causal mask ``[1, 1, T, T]``."""
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    document = torch.repeat_interleave(
        torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device)
    )
    mask = (document[:, None] == document[None, :]).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])


def varlen(q, k, v, lengths, groups):
    """llavakit's own ``sdpa_varlen`` kernel choice on these inputs (varlen_attn on CUDA bf16)."""
    from llavakit.model import attention

    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = groups

    kwargs = attention.varlen_kwargs(_positions(lengths, q.device), 1)
    out, _ = attention.varlen_attention_forward(Module(), q, k, v, None, **kwargs)
    return out.transpose(1, 2)


def flex_factory(lengths: list[int], device: torch.device) -> Callable:
    """FlexAttention with a document-causal block mask built once for the row (as once per training step)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    document = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
    )

    def causal_document(b, h, q_index, kv_index):
        return (document[q_index] == document[kv_index]) & (q_index >= kv_index)

    total = sum(lengths)
    block_mask = create_block_mask(causal_document, None, None, total, total, device=str(device))
    compiled = torch.compile(flex_attention)

    def run(q, k, v, lengths, groups):
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=groups > 1)

    return run


def _positions(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)


def time_fwd_bwd(fn: Callable, inputs: tuple, lengths: list[int], groups: int, repeats: int) -> float:
    """Median milliseconds of forward + backward."""
    q, k, v = (tensor.detach().requires_grad_() for tensor in inputs)
    grad = torch.randn_like(q)
    times = []
    for index in range(repeats + 3):
        _sync(q)
        started = time.perf_counter()
        fn(q, k, v, lengths, groups).backward(grad)
        _sync(q)
        if index >= 3:
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def _sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize()


def relative_error(fn: Callable, inputs: tuple, lengths: list[int], groups: int) -> float:
    """‖out − ref‖ / ‖ref‖ against the float32 per-sample reference."""
    with torch.no_grad():
        out = fn(*inputs, lengths, groups).float()
        reference = per_sample(*(t.float() for t in inputs), lengths, groups)
    return float((out - reference).norm() / reference.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", type=int, default=8192, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=2, help="different rows (length mixes) timed per shape")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU (checks the script runs)"
    )
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    row = 256 if args.smoke else args.row
    rng = random.Random(0)
    kernels: dict[str, Callable] = {
        "sdpa per sample": per_sample,
        "varlen_attn": varlen,
        "sdpa + mask": masked,
    }
    results = []
    for shape, (heads, kv_heads, dim) in SHAPES.items():
        for _ in range(args.rows):
            lengths = sample_lengths(row, rng) if not args.smoke else [100, 60, 96]
            inputs = tuple(
                torch.randn(1, h, row, dim, device=device, dtype=dtype) for h in (heads, kv_heads, kv_heads)
            )
            groups = heads // kv_heads
            row_kernels = {**kernels, "flex document": flex_factory(lengths, device)}
            for name, fn in row_kernels.items():
                try:
                    error = relative_error(fn, inputs, lengths, groups)
                    ms = time_fwd_bwd(fn, inputs, lengths, groups, args.repeats)
                    results.append((shape, len(lengths), name, ms, error, ""))
                except Exception as exc:  # a kernel missing on this torch is a row, not a crash
                    note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
                    results.append((shape, len(lengths), name, float("nan"), float("nan"), note))
    print(
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}"
    )
    print("| shape | samples | kernel | fwd+bwd ms | rel. error vs fp32 | note |")
    print("|---|---|---|---|---|---|")
    for shape, samples, name, ms, error, note in results:
        print(f"| {shape} | {samples} | {name} | {ms:.2f} | {error:.1e} | {note} |")


if __name__ == "__main__":
    main()
