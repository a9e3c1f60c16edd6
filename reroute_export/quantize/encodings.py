"""One recipe, two encodings: block-wise symmetric integer codes and scales of a (K, N)
MatMul weight, written either as ONNX Runtime's com.microsoft MatMulNBits or as a blocked
DequantizeLinear (opset 21) feeding the original MatMul.

The recipe (`quantize_blocks`): the K (input) axis is cut into blocks of `block` rows (the
last one padded with zeros when K is not a multiple); each (block, column) pair has one
scale s = max|w| / qmax, qmax = 2^(bits-1) - 1 (7 for int4, 127 for int8), and codes
q = clip(round(w / s), -qmax, qmax). Symmetric, with no zero point: TensorRT's
DequantizeLinear takes zero points that are zero only (onnx-tensorrt operators.md:
"`x_zero_point` must be zero"), and one recipe must serve both encodings with the very same
codes. Asymmetric blocks would buy one bit of range on skewed blocks but could not be
written for TensorRT at all. The most negative code (-8, -128) is never used, so a code
never moves past the block's max (|w - s q| <= s / 2, no clipping error).

The two layouts of the same codes and scales:

    MatMulNBits (bits 4|8)                    DequantizeLinear-21 + MatMul (TensorRT >= 10)
    B       uint8 (N, k_blocks, block*bits/8) x        INT4|INT8 (K, N), block_size on axis 0
            code + 2^(bits-1), two 4-bit      x_scale  (k_blocks, N), the graph's float type
            codes per byte, low nibble first           (no zero point: 0)
            along K
    scales  (N, k_blocks), the graph's float type
    zero_points omitted: 2^(bits-1), i.e. the symmetric codes

Streaming: MatMulNBits rows are output columns and DequantizeLinear rows are input rows, so
each encoding is written in chunks along its own leading axis (`chunks`) and a weight of any
size passes through memory a few megabytes at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper

BITS = {"int4": 4, "int8": 8}
BLOCKS = (32, 64, 128)
ENCODINGS = ("matmulnbits", "qdq")
MS_DOMAIN = "com.microsoft"
QDQ_OPSET = 21  # INT4 tensors and DequantizeLinear's block_size are opset 21
QDQ_IR = 10  # INT4 needs IR 10
# MatMulNBits' accuracy_level 4 lets the kernel quantize A to int8 per block (its minimum
# accuracy of A); measured on this CPU (AMD EPYC, AVX-512 VNNI, 2 threads, K=1024 N=2752, one
# row): 0.13 ms against 0.48 ms at level 0 (same as the fp32 MatMul, 0.50 ms), levels 1/2
# 0.54/0.41 ms. Only level 4 makes int4 decode faster than fp32 here. Graph tensors stay float.
ACCURACY_LEVEL = 4
CHUNK_ELEMENTS = 1 << 22  # weight elements quantized at once (16 MiB of fp32)


def raise_to_qdq_opset(model: onnx.ModelProto) -> None:
    """Opset 21 / IR 10 (INT4 tensors and blocked DequantizeLinear), the model's functions too."""
    from ..export.onnx_ops import raise_opset  # here: onnxscript loads at import

    raise_opset(model, QDQ_OPSET)
    model.ir_version = max(model.ir_version, QDQ_IR)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def k_blocks(k: int, block: int) -> int:
    return -(-k // block)


def quantize_blocks(w: np.ndarray, bits: int, block: int, scale_dtype: np.dtype = np.dtype(np.float32)
                    ) -> tuple[np.ndarray, np.ndarray]:
    """w (K, N) float -> (codes int8 (K, N), scales (k_blocks, N) of `scale_dtype`).

    Scales are rounded to the graph's float type first and the codes computed against the
    rounded scale, so that code * scale is what either runtime dequantizes."""
    k, n = w.shape
    kb = k_blocks(k, block)
    padded = np.zeros((kb * block, n), np.float32)
    padded[:k] = w
    blocks = padded.reshape(kb, block, n)  # (kb, B, N)
    amax = np.abs(blocks).max(axis=1)  # (kb, N)
    scales = (amax / qmax(bits)).astype(scale_dtype)
    scales[scales == 0] = 1  # an all-zero block (or an fp16 underflow): codes 0 whatever the scale
    q = np.rint(blocks / scales.astype(np.float32)[:, None, :])  # (kb, B, N)
    codes = np.clip(q, -qmax(bits), qmax(bits)).astype(np.int8).reshape(kb * block, n)[:k]
    return codes, scales


def dequantize_blocks(codes: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """codes (K, N), scales (k_blocks, N) -> float32 (K, N)."""
    rows = np.repeat(scales.astype(np.float32), block, axis=0)[: codes.shape[0]]  # (K, N)
    return codes.astype(np.float32) * rows


# ---------------------------------------------------------------- byte layouts


def _pack_nibbles(u: np.ndarray) -> np.ndarray:
    """uint8 values < 16 along the last axis (even length) -> two per byte, low nibble first."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(b: np.ndarray) -> np.ndarray:
    out = np.empty((*b.shape[:-1], b.shape[-1] * 2), np.uint8)
    out[..., 0::2], out[..., 1::2] = b & 0xF, b >> 4
    return out


def nbits_bytes(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """codes (K, N) int8 -> MatMulNBits B (N, k_blocks, block*bits/8) uint8 (padding rows: code 0)."""
    k, n = codes.shape
    kb = k_blocks(k, block)
    u = np.full((n, kb * block), 2 ** (bits - 1), np.uint8)  # the default zero point: value 0
    u[:, :k] = (codes.T.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    u = u.reshape(n, kb, block)  # (N, kb, B)
    return _pack_nibbles(u) if bits == 4 else u


def nbits_codes(b: np.ndarray, k: int, bits: int) -> np.ndarray:
    """MatMulNBits B (N, k_blocks, blob) -> codes (K, N) int8."""
    u = _unpack_nibbles(b) if bits == 4 else b
    n = u.shape[0]
    return (u.reshape(n, -1)[:, :k].astype(np.int16) - 2 ** (bits - 1)).astype(np.int8).T


def qdq_bytes(codes: np.ndarray, bits: int) -> bytes:
    """codes (K, N) int8 -> ONNX INT8 / INT4 raw data (row-major; INT4 two per byte, low nibble first)."""
    if bits == 8:
        return np.ascontiguousarray(codes).tobytes()
    flat = (codes.reshape(-1).astype(np.uint8) & 0xF)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return _pack_nibbles(flat).tobytes()


def qdq_codes(raw: bytes, k: int, n: int, bits: int) -> np.ndarray:
    """ONNX INT8 / INT4 raw data -> codes (K, N) int8."""
    b = np.frombuffer(raw, np.uint8)
    if bits == 8:
        return b.view(np.int8).reshape(k, n).copy()
    u = _unpack_nibbles(b)[: k * n]
    return ((u.astype(np.int16) ^ 8) - 8).astype(np.int8).reshape(k, n)  # 4-bit two's complement


# ---------------------------------------------------------------- chunked writing


@dataclass(frozen=True)
class Spec:
    """One weight's quantization: its shape, the recipe and the encoding."""

    k: int
    n: int
    bits: int
    block: int
    encoding: str
    float_type: int  # TensorProto elem type of the graph's activations (scales have it too)

    @property
    def kb(self) -> int:
        return k_blocks(self.k, self.block)

    def codes_tensor(self) -> tuple[int, list[int]]:
        """(elem type, dims) of the codes initializer."""
        if self.encoding == "matmulnbits":
            return TensorProto.UINT8, [self.n, self.kb, self.block * self.bits // 8]
        return (TensorProto.INT4 if self.bits == 4 else TensorProto.INT8), [self.k, self.n]

    def scales_dims(self) -> list[int]:
        return [self.n, self.kb] if self.encoding == "matmulnbits" else [self.kb, self.n]

    def chunks(self) -> Iterator[tuple[int, int]]:
        """(lo, hi) ranges of the encoding's leading axis: output columns for MatMulNBits,
        input rows (whole blocks) for DequantizeLinear."""
        if self.encoding == "matmulnbits":
            step = max(1, CHUNK_ELEMENTS // self.k)
            yield from ((lo, min(lo + step, self.n)) for lo in range(0, self.n, step))
        else:
            step = max(1, CHUNK_ELEMENTS // (self.n * self.block)) * self.block
            yield from ((lo, min(lo + step, self.k)) for lo in range(0, self.k, step))

    def encode(self, w: np.ndarray) -> tuple[bytes, bytes]:
        """One chunk of the weight (w[:, lo:hi] for MatMulNBits, w[lo:hi] for DequantizeLinear)
        -> (codes bytes, scales bytes) of that chunk, in file order."""
        scale_dtype = onnx.helper.tensor_dtype_to_np_dtype(self.float_type)
        codes, scales = quantize_blocks(w, self.bits, self.block, scale_dtype)
        if self.encoding == "matmulnbits":
            return nbits_bytes(codes, self.bits, self.block).tobytes(), np.ascontiguousarray(scales.T).tobytes()
        return qdq_bytes(codes, self.bits), scales.tobytes()


def quantized_nodes(spec: Spec, node: onnx.NodeProto, codes: str, scales: str) -> list[onnx.NodeProto]:
    """The node(s) that replace `node` (a MatMul reading its weight as input 1)."""
    a, y = node.input[0], node.output[0]
    if spec.encoding == "matmulnbits":
        out = [helper.make_node("MatMulNBits", [a, codes, scales], [y], name=node.name, domain=MS_DOMAIN,
                                K=spec.k, N=spec.n, bits=spec.bits, block_size=spec.block,
                                accuracy_level=ACCURACY_LEVEL)]
    else:
        w = f"{node.name}/weight"  # the dequantized (K, N) weight, as the MatMul read it before
        out = [helper.make_node("DequantizeLinear", [codes, scales], [w], name=f"{node.name}/DequantizeLinear",
                                axis=0, block_size=spec.block),
               helper.make_node("MatMul", [a, w], [y], name=node.name)]
    for n in out:  # the torch module path stays readable (select.module_path)
        n.metadata_props.extend(node.metadata_props)
    return out
