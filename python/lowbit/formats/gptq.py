"""GPTQ checkpoints ("gptq" v1 and "gptq_v2" formats of AutoGPTQ / GPTQModel / Optimum).

Layout (AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda.py; GPTQModel
gptqmodel/nn_modules/qlinear/__init__.py), per linear layer with K inputs and N outputs:
  * qweight int32 [K * bits / 32, N]: input row i in word i // (32/bits), field i % (32/bits)
    at bit bits * (i % (32/bits)), lowest first;
  * qzeros int32 [G, N * bits / 32]: output o in word o // (32/bits), field o % (32/bits);
    v1 stores zero - 1 word-wise (a zero of 0 borrows from the next field), so it is decoded by
    adding 0x11111111 (4-bit; 0x01010101 8-bit) to the whole 32-bit word before splitting it;
    v2 stores the zero itself;
  * scales fp16 [G, N]; g_idx int32 [K]: group of each input (act-order/desc_act makes it a
    permuted map; qweight stays in the original input order); optional bias [N].
  * W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]).
Act-order is served by an input permutation: the columns are sorted by group (stable), so each
group is a run of columns, and the layer gathers its activations in that order.
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
    perm_from_group_index,
    unpack_fields,
)

SUPPORTED_BITS = (4, 8)
SUPPORTED_FORMATS = ("gptq", "gptq_v2")
INTS = (torch.int32,)


def v1_increment(bits: int) -> int:
    """1 in every field of a 32-bit word: what v1 subtracted word-wise from the zeros."""
    return sum(1 << (f * bits) for f in range(32 // bits))


def decode_zero_words(qzeros: torch.Tensor, bits: int, v1: bool) -> torch.Tensor:
    """int32 words -> the int32 words of the true zeros (v1: + 0x11111111 mod 2**32, word-wise)."""
    if not v1:
        return qzeros
    w = (qzeros.to(torch.int64) + v1_increment(bits)) & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


class GPTQReader(Reader):
    method = "gptq"
    markers = ("qweight",)
    known = frozenset({"qweight", "qzeros", "scales", "g_idx", "bias"})

    def __init__(self, qconfig: dict):
        super().__init__(qconfig)
        bits = qconfig.get("bits", 4)
        if bits not in SUPPORTED_BITS:
            raise FormatError(
                f"quantization_config.bits={bits!r}: lowbit reads GPTQ checkpoints with bits "
                f"{list(SUPPORTED_BITS)}"
            )
        fmt = qconfig.get("checkpoint_format", qconfig.get("format", "gptq")) or "gptq"
        fmt = str(getattr(fmt, "value", fmt)).lower()
        if fmt not in SUPPORTED_FORMATS:
            raise FormatError(
                f"quantization_config.checkpoint_format={fmt!r}: lowbit reads GPTQ checkpoint "
                f"formats {list(SUPPORTED_FORMATS)} (not repacked kernel layouts such as marlin)"
            )
        g = parse_group_size(qconfig, "group_size")
        self.bits = bits
        self.group_size = g
        self.v1 = fmt == "gptq"
        self.fmt = fmt

    def summary(self) -> str:
        return f"gptq ({self.fmt}, {self.bits}-bit, group size {self.group_size})"

    def missing(self, prefix, stash):
        return [k for k in ("qweight", "qzeros", "scales") if k not in stash]

    def groups(self, K: int) -> tuple[int, int]:
        """(group size, number of groups) for K inputs; the last group may be partial."""
        g = K if self.group_size == -1 else self.group_size
        return g, math.ceil(K / g)

    def convert(self, prefix, stash, in_features, out_features) -> AffineWeight:
        bits, K, N = self.bits, in_features, out_features
        per = 32 // bits
        name = prefix + "."
        if K % per:
            raise FormatError(f"{name}qweight: in_features {K} is not a multiple of {per}")
        g, G = self.groups(K)
        qweight = check_tensor(name + "qweight", stash["qweight"], INTS, (K // per, N))
        scales = check_tensor(name + "scales", stash["scales"], FLOATS, (G, N))
        qzeros = check_tensor(name + "qzeros", stash["qzeros"], INTS, (G, math.ceil(N / per)))
        check_finite_scales(name + "scales", scales)
        if "g_idx" in stash:
            g_idx = check_tensor(name + "g_idx", stash["g_idx"], (torch.int32, torch.int64), (K,))
        else:
            g_idx = torch.arange(K) // g
        # codes[n, k]: qweight packs the input dimension (rows) of the transposed weight.
        codes = unpack_fields(qweight, bits, dim=0).t()  # [N, K]
        zeros = unpack_fields(decode_zero_words(qzeros, bits, self.v1), bits, dim=1)[:, :N]
        perm, col_group = perm_from_group_index(g_idx, G, name + "g_idx")
        if perm is not None:
            codes = codes.index_select(1, perm)
        w = grouped_weight(name, stash, codes, scales.t(), zeros.t(), col_group, bits, perm)
        w.source_bits = bits
        return w

    def infer_shape(self, stash):
        return stash["scales"].shape[-1], stash["qweight"].shape[0] * (32 // self.bits)


READER = GPTQReader
