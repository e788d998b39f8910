"""AWQ checkpoints, GEMM version (AutoAWQ 0.2.x, Transformers' AwqConfig version "gemm").

Layout (AutoAWQ awq/modules/linear/gemm.py, awq/utils/packing_utils.py), per linear layer with K
inputs and N outputs, group size g:
  * qweight int32 [K, N / 8] and qzeros int32 [K / g, N / 8]: both packed along the OUTPUT
    dimension, nibble f (bits 4f..4f+3) of word j holding column 8j + AWQ_ORDER[f];
  * scales fp16 [K / g, N]; zeros stored as they are (no -1 offset as GPTQ v1);
  * W[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o].
"""

from __future__ import annotations

import math

import torch

from lowbit.formats import Reader
from lowbit.formats._common import (
    FLOATS,
    AffineWeight,
    FormatError,
    check_finite_scales,
    check_tensor,
    grouped_weight,
    parse_group_size,
    unpack_fields,
)
from lowbit.formats.gptq import GPTQReader

# Column held by nibble f of a word (AutoAWQ's interleave, chosen for its fast dequant kernel).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SUPPORTED_VERSIONS = ("gemm",)


def unpack_awq(words: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [R, ceil(cols/8)] -> uint8 [R, cols] in natural column order."""
    fields = unpack_fields(words, 4, dim=1)  # [R, W*8], position 8j + f
    R, W8 = fields.shape
    natural = torch.empty_like(fields).view(R, W8 // 8, 8)
    natural[:, :, list(AWQ_ORDER)] = fields.view(R, W8 // 8, 8)
    return natural.view(R, W8)[:, :cols]


class AWQReader(GPTQReader):
    """Same keys as GPTQ (qweight, qzeros, scales, bias; no g_idx), another packing."""

    method = "awq"
    known = frozenset({"qweight", "qzeros", "scales", "bias"})

    def __init__(self, qconfig: dict):
        Reader.__init__(self, qconfig)
        bits = qconfig.get("bits", qconfig.get("w_bit", 4))
        if bits != 4:
            raise FormatError(f"quantization_config.bits={bits!r}: lowbit reads 4-bit AWQ only")
        version = str(qconfig.get("version", "gemm")).lower()
        version = version.removeprefix("awqlinearversion.")
        if version not in SUPPORTED_VERSIONS:
            raise FormatError(
                f"quantization_config.version={qconfig.get('version')!r}: lowbit reads AWQ "
                f"versions {list(SUPPORTED_VERSIONS)} (GEMV, Marlin, ExLlama layouts differ)"
            )
        if qconfig.get("zero_point", True) is not True:
            raise FormatError(
                "quantization_config.zero_point=false: lowbit reads AWQ GEMM checkpoints with zero "
                "points (zero_point=true, AutoAWQ's default)"
            )
        g = parse_group_size(qconfig, "group_size", "q_group_size")
        self.group_size = g

    def summary(self) -> str:
        return f"awq (gemm, 4-bit, group size {self.group_size})"

    def convert(self, prefix, stash, in_features, out_features) -> AffineWeight:
        K, N = in_features, out_features
        name = prefix + "."
        g, G = self.groups(K)
        W8 = math.ceil(N / 8)
        qweight = check_tensor(name + "qweight", stash["qweight"], (torch.int32,), (K, W8))
        qzeros = check_tensor(name + "qzeros", stash["qzeros"], (torch.int32,), (G, W8))
        scales = check_tensor(name + "scales", stash["scales"], FLOATS, (G, N))
        check_finite_scales(name + "scales", scales)
        codes = unpack_awq(qweight, N).t()  # [N, K]
        zeros = unpack_awq(qzeros, N).t().float()  # [N, G]
        w = grouped_weight(name, stash, codes, scales.t(), zeros, torch.arange(K) // g, 4)
        w.source_bits = 4
        return w

    def infer_shape(self, stash):
        return stash["scales"].shape[-1], stash["qweight"].shape[0]


READER = AWQReader
