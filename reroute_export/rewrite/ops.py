"""The routing steps as torch.library custom ops (namespace `reroute`).

In the exported graph each becomes one node in the `reroute` ONNX domain with an attached
local function of standard ops (export/onnx_ops.py), so ONNX Runtime and TensorRT's
parser run them without plugins, and a TensorRT plugin can replace any of them later.

The cut follows what is routing-specific and nothing else (scoring stays ordinary ops
of the decision layer): pick K of a contiguous visual block, gather the kept rows into a
compact sequence (the write-back into the full buffer is the host's: rewrite/segments.py). All shapes are static
given N, K and the text length: no NonZero, no data-dependent shapes.

Visual tokens are contiguous in the prompt ([vs, vs + m) in the source sequence), so the
kept positions, ascending, are  [0, vs) ++ vs + selected ++ [vs + m, T),  built with
Range/Where arithmetic instead of a sort.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("reroute::select_visual", mutates_args=())
def select_visual(scores: torch.Tensor, visual_start: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """(B, T) scores, visual block [vs, vs + m) -> (B, k) ascending block indices of the k best.

    Ties break toward the lower index (stable sort; ONNX TopK specifies the same).
    """
    pos = visual_start.view(-1, 1) + torch.arange(m, device=scores.device)  # (B, m)
    block = scores.gather(1, pos)  # (B, m)
    order = torch.sort(block, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
    return order.sort(dim=1).values


@select_visual.register_fake
def _(scores, visual_start, m, k):
    return scores.new_empty((scores.shape[0], k), dtype=torch.long)


def kept_index(length: int, local: torch.Tensor, visual_start: torch.Tensor, m: int) -> torch.Tensor:
    """Ascending source positions of the kept rows: (B, length - m + k)."""
    k = local.shape[1]
    i = torch.arange(length - m + k, device=local.device).view(1, -1)  # (1, T')
    vs = visual_start.view(-1, 1)  # (B, 1)
    j = (i - vs).clamp(0, k - 1)  # (B, T') slot within the selected block
    chosen = vs + local.gather(1, j)  # (B, T')
    return torch.where(i < vs, i, torch.where(i < vs + k, chosen, i - k + m))


@torch.library.custom_op("reroute::route_gather", mutates_args=())
def route_gather(
    x: torch.Tensor, local: torch.Tensor, visual_start: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact sequence of the kept rows of x (B, T, D): rows (B, T - m + k, D) and their positions."""
    idx = kept_index(x.shape[1], local, visual_start, m)  # (B, T')
    rows = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    return rows, idx


@route_gather.register_fake
def _(x, local, visual_start, m):
    t = x.shape[1] - m + local.shape[1]
    return x.new_empty((x.shape[0], t, x.shape[2])), local.new_empty((x.shape[0], t))
