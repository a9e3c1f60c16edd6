"""Selection of the K_s visual tokens a stage runs on, and the kept-index set.

Ties between equal scores break toward the LOWER visual index: a stable descending
sort keeps equal scores in index order. ONNX TopK specifies the same rule, so the
exported graphs agree with this reference even on exact ties.
"""

from __future__ import annotations

import torch


def top_k_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) scores -> (B, k) indices of the k best, sorted ascending (causal order kept)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
    return order.sort(dim=1).values


def kept_positions(text_pos: torch.Tensor, vis_pos: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Sequence positions a stage runs on: text ∪ selected visual, ascending. (B, L - N + k)."""
    chosen = vis_pos.gather(1, selected)  # (B, k)
    return torch.cat([text_pos, chosen], dim=1).sort(dim=1).values


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (B, T, ...) rows at idx (B, T') -> (B, T', ...)."""
    shape = idx.shape + x.shape[2:]
    return x.gather(1, idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(shape))


def scatter_rows(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Copy of x with rows (B, T', ...) written at idx (B, T'); other rows untouched."""
    return x.scatter(1, idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(rows.shape), rows)
