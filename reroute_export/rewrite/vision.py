"""The vision towers as static-shape modules: pixel values -> projected visual tokens (N, D).

Each family picks its module (`Family.vision_module`); export/vision.py writes it as
vision.onnx. These are rewrites in the sense of rewrite/segments.py: the HF model's own
weights and computation, with every shape fixed when the module is built.

LLaVA-1.5: the CLIP vision tower at the model's image size, the feature layer the config
names (CLS dropped for the "default" strategy) and the multimodal projector; the model's
own `get_image_features`, traced as is.

Qwen2.5-VL: the vision transformer and merger, one graph for every image size. HF's
forward derives window order, rotary angles and attention chunks from `grid_thw` with
Python loops and `.tolist()` (data-dependent); here they are computed on the host per
grid (`grid_tables`: at export, once per image-size bucket, shipped with the artifact)
and fed to the graph beside the patches: the window permutation and its inverse, the
rotary cos/sin table (already permuted) and each patch's window id, from which the graph
builds the window attention's block mask (HF's per-chunk attention calls). The patch axis
is free, so the vision weights are in the artifact once however many sizes it takes.
Each block runs the model's own weights; the exported graph is held to HF's forward by
the post-export check (logits, tests/test_export_artifact.py) and by parity's vision
metrics.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import contract as C


class LlavaVision(nn.Module):
    """(1, 3, H, W) pixel values -> (N, D) image features, HF's computation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model.model
        cfg = model.config
        self.layer, self.strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.inner.get_image_features(pixel_values=pixel_values, vision_feature_layer=self.layer,
                                            vision_feature_select_strategy=self.strategy, return_dict=True)
        return out.pooler_output[0]  # (N, D)


def grid_tables(visual: nn.Module, grid_thw: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """The data-dependent part of HF's vision forward for one image grid, computed on the host
    (contract.VISION_TABLES): the window permutation and its inverse, the rotary cos/sin
    table (already in window order) and each patch's attention-window id."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    if grid_thw[0] != 1:
        raise ValueError(f"image grid {list(grid_thw)}: the vision graph takes one image (t = 1)")
    grid = torch.tensor([list(grid_thw)], dtype=torch.long)  # (1, 3)
    seq, unit = int(grid.prod()), visual.spatial_merge_unit
    if seq % unit:
        raise ValueError(f"image grid {list(grid_thw)} is not a multiple of the merge unit {unit}")
    with torch.no_grad():
        positions = get_vision_position_ids(grid, visual.spatial_merge_size)
        window_index, cu_window = get_vision_window_index(
            grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size)
        cos, sin = visual.rotary_pos_emb(torch.zeros(seq, 1), positions)  # (S, hd) each
    order = (window_index[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)  # (S,) token order
    blocks = torch.bucketize(torch.arange(seq), cu_window.to(torch.long)[1:], right=True)  # (S,) window id
    return {C.WINDOW_INDEX: window_index.to(torch.long), C.REVERSE_INDEX: torch.argsort(window_index),
            C.ROTARY_COS: cos[order].float(), C.ROTARY_SIN: sin[order].float(), C.WINDOW_BLOCKS: blocks}


class QwenVision(nn.Module):
    """Qwen2.5-VL vision tower + merger for any one-image grid, no data-dependent shapes.

    (S, C*tp*p*p) flattened patches, as the HF processor gives them, and the grid's tables
    (`grid_tables`) -> (S / merge², D). The window attention's additive mask is built in the
    graph from the window ids (0 within a window, dtype-min across); the full-attention
    blocks see the whole image (one image: one block, HF's mask there is all zeros).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        visual = model.model.visual
        self.visual, self.unit = visual, visual.spatial_merge_unit
        self.dtype = visual.patch_embed.proj.weight.dtype
        self.full_blocks = set(visual.fullatt_block_indexes)

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        s = x.shape[0]
        q, k, v = attn.qkv(x).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, hd)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, S, hd)
        w = torch.matmul(q, k.transpose(2, 3)) * attn.scaling  # (1, H, S, S)
        if mask is not None:
            w = w + mask
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(w, v).transpose(1, 2).reshape(s, -1)  # (S, H*hd)
        return attn.proj(out)

    def forward(self, pixel_values: torch.Tensor, window_index: torch.Tensor, reverse_index: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, window_blocks: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.patch_embed(pixel_values)  # (S, C)
        s = x.shape[0]
        x = x.reshape(-1, self.unit, x.shape[-1])[window_index].reshape(s, -1)
        same = window_blocks[:, None] == window_blocks[None, :]  # (S, S)
        zero = torch.zeros((), dtype=self.dtype)
        window_mask = torch.where(same, zero, torch.finfo(self.dtype).min)[None, None]  # (1, 1, S, S)
        for i, blk in enumerate(v.blocks):
            mask = None if i in self.full_blocks else window_mask
            x = x + self._attention(blk.attn, blk.norm1(x), cos, sin, mask)
            x = x + blk.mlp(blk.norm2(x))
        return v.merger(x)[reverse_index]  # (S / unit, D)
