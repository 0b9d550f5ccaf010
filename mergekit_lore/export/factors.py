"""Factor math of the export: LoRA factors ``(B, A)`` from the solver's ``LowRank`` task vectors."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from mergekit_lore.svt import LowRank, lowrank_core

Factors = Tuple[torch.Tensor, torch.Tensor]  # (B: m x r, A: r x k), B @ A = delta


def split_factors(delta: LowRank, *, dtype: torch.dtype = torch.float32) -> Factors:
    """``(B, A)`` with ``B @ A == delta.left @ delta.right.T``, ``B = U sqrt(S)``, ``A = sqrt(S) V^T``.

    Computed in float64 from the SVD of the r x r core of two thin QRs
    (``svt.lowrank_core``); numerically zero singular values are dropped (so the rank
    can only go down).
    """
    rows, cols = delta.shape
    if delta.rank == 0:
        return torch.zeros(rows, 0, dtype=dtype), torch.zeros(0, cols, dtype=dtype)
    on_cpu = LowRank(delta.left.detach().cpu(), delta.right.detach().cpu())
    q_left, core, q_right = lowrank_core(on_cpu, dtype=torch.float64, bases=True)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    tolerance = float(s[0]) * max(s.numel(), 1) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    keep = int((s > tolerance).sum())
    root = s[:keep].sqrt()
    b = (q_left @ u[:, :keep]) * root
    a = root[:, None] * (vh[:keep] @ q_right.T)
    return b.to(dtype).contiguous(), a.to(dtype).contiguous()


def pad_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> Factors:
    """Zero-pad factors ``(B: m x r0, A: r0 x k)`` to rank ``rank``."""
    extra = rank - b.shape[1]
    if extra <= 0:
        return b, a
    return (
        torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1),
        torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0),
    )


def stack_experts(
    pieces: Dict[Tuple[int, ...], Factors],
    shape: Tuple[int, ...],
    transposed: bool,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """PEFT ``ParamWrapper`` factors for a 3-D stack (experts, d1, d2) of per-slice ``(B_e, A_e)``.

    PEFT reshapes ``lora_A`` (r E, in) to (E, r, in) and ``lora_B`` (out, r E) to (out, r, E).
    For a stack stored (E, out, in) (not ``is_transposed``): delta_e = lora_B[:, :, e] @ lora_A[e].
    For (E, in, out) (``is_transposed``): delta_e = (lora_B[:, :, e] @ lora_A[e])^T.
    Returns ``(lora_A, lora_B, rank)``; the rank is the largest over the slices.
    """
    experts, d1, d2 = shape
    rank = max([b.shape[1] for b, _ in pieces.values()] + [1])
    dtype = next(iter(pieces.values()))[0].dtype
    lora_a = torch.zeros(experts, rank, d1 if transposed else d2, dtype=dtype)
    lora_b = torch.zeros(d2 if transposed else d1, rank, experts, dtype=dtype)
    for (e,), (b, a) in pieces.items():
        b, a = pad_factors(b, a, rank)
        if transposed:
            lora_a[e] = b.T
            lora_b[:, :, e] = a.T
        else:
            lora_a[e] = a
            lora_b[:, :, e] = b
    return lora_a.reshape(experts * rank, -1), lora_b.reshape(lora_b.shape[0], -1), rank
