"""compressed-tensors checkpoints (llm-compressor, vLLM): "pack-quantized" int4/int8 and
"int-quantized" / "naive-quantized" int8 (W8A8: the weights are read, activation settings ignored).

Layout (compressed-tensors 0.20 compressors/pack_quantized/{base,helpers}.py,
compressors/naive_quantized/base.py, quantization/lifecycle/forward_helpers.py), per linear
layer [N, K]:
  * pack-quantized: weight_packed int32 [N, ceil(K * bits / 32)]: the signed value q is stored as
    q + 2**(bits-1), element k of a row at bit k * bits of the row's bit stream, lowest first (for
    bits 4 and 8: word k // (32/bits), field k % (32/bits)); weight_shape int64 [2] = [N, K];
  * int-/naive-quantized: weight int8 [N, K] holding q itself;
  * weight_scale [N, G] in the model dtype (G = 1 per channel, G = K / g per group, [1] or [1, 1]
    per tensor, [ceil(N/bh), ceil(K/bw)] per block); asymmetric only: weight_zero_point, for
    pack-quantized group/channel int32 [ceil(N * bits / 32), G] packed along N the same way
    (value z + 2**(bits-1)), otherwise int8 like the scale;
  * w = (q - z) * scale, computed in the scale's dtype.
lowbit's unsigned codes are the stored (offset) values, and the zero is z + 2**(bits-1) (just
2**(bits-1) when symmetric), so (code - zero) * scale is the same number.
"""

from __future__ import annotations

import math
import re

import torch

from lowbit.formats import Reader
from lowbit.formats._common import (
    FLOATS,
    AffineWeight,
    FormatError,
    check_finite_scales,
    check_tensor,
    grouped_weight,
    perm_from_group_index,
    storage_bits,
    unpack_fields,
)

PACKED_BITS = (4, 8)
INT_FORMATS = ("int-quantized", "naive-quantized")
FORMATS = ("pack-quantized", *INT_FORMATS)
STRATEGIES = ("group", "channel", "tensor", "block")
IGNORED = frozenset(
    {"input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point"}
)


def _matches(target: str, name: str) -> bool:
    # compressed-tensors utils/match.py: "re:" targets are re.match'ed against the module name,
    # other targets match the name exactly or the module class ("Linear" for every linear layer).
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, "Linear")


class CompressedTensorsReader(Reader):
    method = "compressed-tensors"
    markers = ("weight_packed", "weight_scale")
    known = frozenset(
        {"weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point"}
        | {"weight_g_idx", "bias"}
        | IGNORED
    )

    def __init__(self, qconfig: dict):
        super().__init__(qconfig)
        status = qconfig.get("quantization_status", "compressed")
        if status != "compressed":
            raise FormatError(
                f"quantization_config.quantization_status={status!r}: lowbit reads compressed "
                "checkpoints (status 'compressed')"
            )
        groups = qconfig.get("config_groups") or {}
        if not isinstance(groups, dict) or not groups:
            raise FormatError("quantization_config.config_groups: missing or empty")
        self.global_format = qconfig.get("format")
        self.groups = []
        for gname, scheme in groups.items():
            where = f"quantization_config.config_groups.{gname}"
            if not isinstance(scheme, dict):
                raise FormatError(f"{where}: expected an object, got {type(scheme).__name__}")
            w = scheme.get("weights")
            if w is None:
                continue  # activation-only group: no weights to read
            fmt = scheme.get("format") or self.global_format
            if fmt not in FORMATS:
                raise FormatError(
                    f"{where}.format={fmt!r}: lowbit reads compressed-tensors formats {list(FORMATS)}"
                )
            self._check_weights(w, where + ".weights", fmt)
            targets = scheme.get("targets") or []
            self.groups.append((list(targets), dict(w), fmt, gname))
        if not self.groups:
            raise FormatError("quantization_config.config_groups: no group quantizes weights")

    @staticmethod
    def _check_weights(w: dict, where: str, fmt: str) -> None:
        kind, bits = w.get("type", "int"), w.get("num_bits")
        if kind != "int":
            raise FormatError(f"{where}.type={kind!r}: lowbit reads integer (type 'int') weights")
        allowed = PACKED_BITS if fmt == "pack-quantized" else (8,)
        if bits not in allowed:
            raise FormatError(
                f"{where}.num_bits={bits!r}: lowbit reads {fmt} weights with num_bits {list(allowed)}"
            )
        strategy = w.get("strategy")
        if strategy not in STRATEGIES:
            raise FormatError(
                f"{where}.strategy={strategy!r}: lowbit reads weight strategies {list(STRATEGIES)}"
            )
        if strategy == "group" and not (
            isinstance(w.get("group_size"), int) and w["group_size"] > 0
        ):
            raise FormatError(f"{where}.group_size={w.get('group_size')!r}: must be a positive int")
        if w.get("dynamic") not in (None, False):
            raise FormatError(f"{where}.dynamic={w['dynamic']!r}: weights must be static")

    def summary(self) -> str:
        parts = []
        for _, w, fmt, _ in self.groups:
            s = w.get("strategy")
            gs = f" g{w['group_size']}" if s == "group" else ""
            sym = "sym" if w.get("symmetric", True) else "asym"
            parts.append(f"{fmt} int{w['num_bits']} {s}{gs} {sym}")
        return "compressed-tensors (" + "; ".join(parts) + ")"

    def is_quantized(self, local_keys) -> bool:
        # pack-quantized layers have weight_packed; int-quantized ones an int8 weight + a scale.
        return "weight_packed" in local_keys or (
            "weight_scale" in local_keys and "weight" in local_keys
        )

    def _scheme(self, prefix: str):
        for targets, w, fmt, gname in self.groups:
            if any(_matches(t, prefix) for t in targets):
                return w, fmt, gname
        if len(self.groups) == 1:
            return self.groups[0][1:]
        raise FormatError(
            f"{prefix}: holds quantized weights but no quantization_config.config_groups target "
            "matches it"
        )

    def missing(self, prefix, stash):
        w, fmt, _ = self._scheme(prefix)
        need = ["weight_scale"]
        need += ["weight_packed", "weight_shape"] if fmt == "pack-quantized" else ["weight"]
        if not w.get("symmetric", True):
            need.append("weight_zero_point")
        return [k for k in need if k not in stash]

    def convert(self, prefix, stash, in_features, out_features) -> AffineWeight:
        w, fmt, gname = self._scheme(prefix)
        K, N = in_features, out_features
        name = prefix + "."
        bits = w["num_bits"]
        sbits = storage_bits(bits)
        offset = 1 << (bits - 1)
        sym = w.get("symmetric", True)
        if fmt == "pack-quantized":
            per = 32 // bits
            shape = check_tensor(
                name + "weight_shape", stash["weight_shape"], (torch.int64, torch.int32), (2,)
            )
            if shape.tolist() != [N, K]:
                raise FormatError(
                    f"{name}weight_shape: {shape.tolist()} does not match the layer's [{N}, {K}]"
                )
            packed = check_tensor(
                name + "weight_packed",
                stash["weight_packed"],
                (torch.int32,),
                (N, math.ceil(K / per)),
            )
            codes = unpack_fields(packed, bits, dim=1)[:, :K]  # stored values q + offset
        else:
            q = check_tensor(name + "weight", stash["weight"], (torch.int8,), (N, K))
            codes = (q.to(torch.int16) + offset).to(torch.uint8)
        scale = check_tensor(name + "weight_scale", stash["weight_scale"], FLOATS)
        check_finite_scales(name + "weight_scale", scale)
        strategy = w["strategy"]
        if strategy == "group":
            G = math.ceil(K / w["group_size"])
            col_group = torch.arange(K) // w["group_size"]
            rows = scale
        elif strategy == "channel":
            G, col_group, rows = 1, torch.zeros(K, dtype=torch.int64), scale
        elif strategy == "tensor":
            G, col_group = 1, torch.zeros(K, dtype=torch.int64)
            if scale.numel() != 1:
                raise FormatError(
                    f"{name}weight_scale: a per-tensor scale has 1 value, got {list(scale.shape)}"
                )
            rows = scale.reshape(1, 1).expand(N, 1)
        else:  # block [bh, bw]: every row of a block row shares its blocks' scales
            bh, bw = (w.get("block_structure") or [0, 0])[:2]
            if not (bh > 0 and bw > 0):
                raise FormatError(
                    f"config group {gname}: block strategy needs block_structure [rows, cols]"
                )
            G, col_group = math.ceil(K / bw), torch.arange(K) // bw
            check_tensor(name + "weight_scale", scale, FLOATS, (math.ceil(N / bh), G))
            rows = scale.repeat_interleave(bh, dim=0)[:N]
        if strategy in ("group", "channel"):
            check_tensor(name + "weight_scale", scale, FLOATS, (N, G))
        if sym:
            zrows = torch.full((N, G), float(offset))
        else:
            zp = stash["weight_zero_point"]
            if fmt == "pack-quantized" and strategy in ("group", "channel"):
                zp = check_tensor(
                    name + "weight_zero_point", zp, (torch.int32,), (math.ceil(N * bits / 32), G)
                )
                zrows = unpack_fields(zp, bits, dim=0)[:N].float()  # stored z + offset
            else:
                zp = check_tensor(name + "weight_zero_point", zp, (torch.int8, torch.int32))
                if zp.numel() != (1 if strategy == "tensor" else rows.shape[0] * G):
                    raise FormatError(
                        f"{name}weight_zero_point: {list(zp.shape)} does not match the scale's "
                        f"{list(scale.shape)}"
                    )
                zrows = zp.reshape(-1, G if strategy != "tensor" else 1).float() + offset
                if strategy == "tensor":
                    zrows = zrows.expand(N, 1)
                elif strategy == "block":
                    zrows = zrows.repeat_interleave(bh, dim=0)[:N]
        perm = None
        if "weight_g_idx" in stash:  # act-order "group" (older llm-compressor): as GPTQ's g_idx
            g_idx = check_tensor(
                name + "weight_g_idx", stash["weight_g_idx"], (torch.int32, torch.int64), (K,)
            )
            perm, col_group = perm_from_group_index(g_idx, G, name + "weight_g_idx")
            if perm is not None:
                codes = codes.index_select(1, perm)
        out = grouped_weight(name, stash, codes, rows, zrows, col_group, sbits, perm)
        out.source_bits = bits
        return out

    def infer_shape(self, stash):
        if "weight_shape" in stash:
            n, k = stash["weight_shape"].tolist()
            return int(n), int(k)
        return tuple(stash["weight"].shape)


READER = CompressedTensorsReader
