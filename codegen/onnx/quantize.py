"""Packed weights for ONNX Runtime's com.microsoft MatMulNBits.

- ``grid4`` (used by the lowering's linear, lower.py): a weight whose every block of 32 along K already lies on a
  4-bit grid (lo + d·q, q in 0..15 — what a Q4_0/Q4_1 GGUF dequantises to) is stored as those 4-bit codes with the
  block's scale d, plus the blocks' offsets: the same numbers up to f32 rounding in about an eighth of the f32
  bytes, computed in f32 (accuracy level 1). Weights off the grid stay as they are. Lossless, so the ONNX
  backend always does it. MatMulNBits' fast f32 kernel takes no zero point (it subtracts 8) while a Q4_1 block's
  minimum is any float, so ``x @ W.T`` = MatMulNBits(x; codes, scales) + (x summed per block) @ offsets; the
  block sums are one small MatMul by a constant 0/1 matrix [K, K/32].
- ``grid8``: a weight exactly on a symmetric 8-bit grid per block (a Q8_0 GGUF's) as two exact 4-bit terms.
- ``weight_bits=4`` (lossy): the same packing after rounding every weight onto its blocks' 4-bit grids (Q4_1).
- ``quantize_weights`` (``weight_bits=8``, lossy): ONNX Runtime's own quantizer (integer zero points) with int8
  compute (accuracy level 4), for every constant MatMul weight.
"""

from __future__ import annotations

import numpy as np
import onnx

BLOCK = 32


def grid4(w: np.ndarray, exact: bool = True):
    """([(codes [N, K/32, 16] uint8, scales [N, K/32])], offsets [K/32, N]) for a weight ``w`` [N, K] whose every
    block of 32 along K is exactly on a 4-bit grid (relative error <= 1e-6), else None. Block b of output n is
    ``scales[n, b] * (code - 8) + offsets[b, n]``. Without ``exact`` every weight is rounded onto its blocks'
    grids (lo = min, d = (max - min) / 15: llama.cpp's Q4_1), which is lossy."""
    blocks = _blocks(w)
    if blocks is None:
        return None
    lo, hi = blocks.min(-1), blocks.max(-1)
    step = (hi - lo) / np.float32(15)
    step = np.where(step > 0, step, np.float32(1))  # a constant block: code 0
    codes = np.clip(np.rint((blocks - lo[..., None]) / step[..., None]), 0, 15)
    if exact:
        error = np.abs(codes * step[..., None] + lo[..., None] - blocks).max()
        if error > 1e-6 * max(float(np.abs(blocks).max()), 1e-30):
            return None
    return [(_pack4(codes), step.astype(np.float32))], (lo + 8 * step).T.astype(np.float32)


def grid8(w: np.ndarray):
    """A weight whose every block of 32 along K is exactly d·q with q in -127..127 (what a Q8_0 GGUF dequantises
    to) as two 4-bit terms, q = 16·hi + lo: ([(hi + 8 codes, 16·d), (lo codes, d)], offsets 8·d), else None.
    (ONNX Runtime 1.32's 8-bit MatMulNBits with f32 compute is a slow path: 95 ms for SmolLM2's lm_head, while
    the two 4-bit terms take 2.8 ms and f32 3.2 ms: ``python bench/profile_cpu_decode.py --lm-head``.)"""
    blocks = _blocks(w)
    if blocks is None:
        return None
    amax = np.abs(blocks).max(-1)
    step = np.where(amax > 0, amax / np.float32(127), np.float32(1))
    q = np.rint(blocks / step[..., None])
    error = np.abs(q * step[..., None] - blocks).max()
    if error > 1e-6 * max(float(amax.max()), 1e-30):
        return None
    hi = np.floor(q / 16)
    lo = q - 16 * hi
    terms = [(_pack4(hi + 8), (16 * step).astype(np.float32)), (_pack4(lo), step.astype(np.float32))]
    return terms, (8 * step).T.astype(np.float32)


def _blocks(w: np.ndarray):
    """An f32 weight [N, K] as blocks [N, K/32, 32] along K, or None when it cannot be packed."""
    if w.dtype != np.float32 or w.ndim != 2 or w.shape[1] % BLOCK or w.size == 0:
        return None
    return w.reshape(w.shape[0], w.shape[1] // BLOCK, BLOCK)


def _pack4(codes: np.ndarray) -> np.ndarray:
    codes = codes.astype(np.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)  # the first element in the low nibble


class Packer:
    """``grid4`` (then ``grid8``) per weight, remembered by the weight's memory (prefill and decode share their
    weights): ``(terms, offsets)`` or None."""

    def __init__(self, exact: bool = True):
        self.exact = exact
        self._seen: dict = {}

    def __call__(self, w: np.ndarray):
        key = (w.__array_interface__["data"][0], w.shape, w.strides)
        if key not in self._seen:
            found = grid4(w, self.exact)
            self._seen[key] = found if found is not None or not self.exact else grid8(w)
        return self._seen[key]


def quantize_weights(model: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    """Every MatMul by a constant weight becomes MatMulNBits through ONNX Runtime's quantizer: ``bits``-bit codes
    with a scale and an integer zero point per block of 32 along K, activations quantized to int8 per block for
    the product (accuracy level 4: ONNX Runtime's fast CPU path; with f32 compute the 4-bit product was 1.4x
    slower and the 8-bit one had no fast kernel at all, measured on SmolLM2)."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK, is_symmetric=False, accuracy_level=4,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer.model.model
