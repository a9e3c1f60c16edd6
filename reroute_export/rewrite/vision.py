"""The vision towers as static-shape modules: pixel values -> projected visual tokens (N, D).

Each family picks its module (`Family.vision_module`); export/vision.py writes it as
vision.onnx. These are rewrites in the sense of rewrite/segments.py: the HF model's own
weights and computation, with every shape fixed when the module is built.

LLaVA-1.5: the CLIP vision tower at the model's image size, the feature layer the config
names (CLS dropped for the "default" strategy) and the multimodal projector; the model's
own `get_image_features`, traced as is.

Qwen2.5-VL: the vision transformer and merger at one image grid fixed at export time.
HF's forward derives window order, rotary angles and attention chunks from `grid_thw`
with Python loops and `.tolist()` (data-dependent); here they are computed once for the
fixed grid and stored as constants of the graph: the window permutation and its inverse,
the rotary cos/sin table (already permuted), and two additive block masks (window
attention, full attention) that replace HF's per-chunk attention calls. Each block runs
the model's own weights; the exported graph is held to HF's forward by the post-export
check (logits, tests/test_export_artifact.py) and by parity's vision metrics.
"""

from __future__ import annotations

import torch
from torch import nn


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


def block_mask(cu_seqlens: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, S, S) additive mask: 0 inside each [cu[i], cu[i+1]) block, dtype-min across blocks."""
    bounds = cu_seqlens.to(torch.long)
    block = torch.bucketize(torch.arange(length), bounds[1:], right=True)  # (S,) block id per token
    same = block[:, None] == block[None, :]  # (S, S)
    mask = torch.zeros(length, length, dtype=dtype).masked_fill(~same, torch.finfo(dtype).min)
    return mask[None, None]


class QwenFixedGridVision(nn.Module):
    """Qwen2.5-VL vision tower + merger for one fixed `(t, h, w)` grid, no data-dependent shapes.

    (t*h*w, C*tp*p*p) flattened patches, as the HF processor gives them -> (t*h*w/merge², D).
    """

    def __init__(self, model: nn.Module, grid_thw: tuple[int, int, int]) -> None:
        super().__init__()
        from transformers.vision_utils import (get_vision_attention_seqlens, get_vision_position_ids,
                                               get_vision_window_index)

        visual = model.model.visual
        self.visual = visual
        cfg = visual.config
        dtype = visual.patch_embed.proj.weight.dtype
        grid = torch.tensor([list(grid_thw)], dtype=torch.long)  # (1, 3)
        seq = int(grid.prod())
        unit = visual.spatial_merge_unit
        if seq % unit:
            raise ValueError(f"image grid {list(grid_thw)} is not a multiple of the merge unit {unit}")
        with torch.no_grad():
            positions = get_vision_position_ids(grid, visual.spatial_merge_size)
            cu_full, _ = get_vision_attention_seqlens(grid, cfg)
            window_index, cu_window = get_vision_window_index(
                grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size)
            cos, sin = visual.rotary_pos_emb(torch.zeros(seq, 1), positions)  # (S, hd) each
            order = (window_index[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)  # (S,) token order
        self.seq, self.unit = seq, unit
        self.register_buffer("window_index", window_index.to(torch.long), persistent=False)  # (S / unit,)
        self.register_buffer("reverse_index", torch.argsort(window_index), persistent=False)
        self.register_buffer("cos", cos[order].float(), persistent=False)  # (S, hd)
        self.register_buffer("sin", sin[order].float(), persistent=False)
        self.register_buffer("window_mask", block_mask(cu_window, seq, dtype), persistent=False)
        self.register_buffer("full_mask", block_mask(cu_full, seq, dtype), persistent=False)
        self.full_blocks = set(visual.fullatt_block_indexes)

    def _attention(self, attn: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        s = x.shape[0]
        q, k, v = attn.qkv(x).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, hd)
        q, k = apply_rotary_pos_emb_vision(q, k, self.cos, self.sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, S, hd)
        w = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + mask  # (1, H, S, S)
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(w, v).transpose(1, 2).reshape(s, -1)  # (S, H*hd)
        return attn.proj(out)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.patch_embed(pixel_values)  # (S, C)
        x = x.reshape(self.seq // self.unit, self.unit, -1)[self.window_index].reshape(self.seq, -1)
        for i, blk in enumerate(v.blocks):
            mask = self.full_mask if i in self.full_blocks else self.window_mask
            x = x + self._attention(blk.attn, blk.norm1(x), mask)
            x = x + blk.mlp(blk.norm2(x))
        return v.merger(x)[self.reverse_index]  # (S / unit, D)
