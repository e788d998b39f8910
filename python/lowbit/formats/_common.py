"""What every checkpoint reader shares: the affine weight it produces, bit unpacking, checks.

The lowbit affine format (see ../../../README.md, "Other checkpoint formats"):
  * W [N, K] (out_features, in_features), unsigned codes q, storage bits 4 or 8;
  * bits=4: two codes a byte over the row-major flat index i = n*K + k, element 2j in the HIGH
    nibble of byte j (NF4's packing); bits=8: one code a byte;
  * groups of `group_size` consecutive elements along K (group_size divides K), group id i // g;
  * fp32 scales and zeros per group, decoded as w = (float(q) - zero) * scale;
  * optional input permutation perm [K]: W_stored[:, j] = W[:, perm[j]].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class AffineWeight:
    """One linear layer's weight in lowbit's affine format (see the module docstring)."""

    packed: torch.Tensor  # uint8 [(N*K+1)//2] (bits 4) or [N*K] (bits 8)
    scales: torch.Tensor  # fp32 [N * K // group_size]
    zeros: torch.Tensor  # fp32 [N * K // group_size]
    bits: int  # storage bits, 4 or 8
    group_size: int
    shape: tuple[int, int]  # (N, K)
    perm: torch.Tensor | None = None  # int64 [K]
    bias: torch.Tensor | None = None
    source_bits: int | None = None  # bits of the codes as the source format counts them


def storage_bits(bits: int) -> int:
    """Codes of up to 4 bits live in 4-bit storage, up to 8 in 8-bit storage."""
    return 4 if bits <= 4 else 8


class FormatError(ValueError):
    """A checkpoint tensor or config field that a reader cannot use (always names it)."""


def check_tensor(
    name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], shape: tuple | None = None
) -> torch.Tensor:
    """t itself, after checking its dtype and (when given) its exact shape; FormatError otherwise."""
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise FormatError(
            f"{name}: dtype must be {names}, got {str(t.dtype).removeprefix('torch.')}"
        )
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise FormatError(f"{name}: shape must be {list(shape)}, got {list(t.shape)}")
    return t


def check_finite_scales(name: str, s: torch.Tensor) -> None:
    if not torch.isfinite(s).all():
        raise FormatError(f"{name}: holds NaN or Inf values")


def unpack_fields(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Split int32 words into their 32 // bits unsigned fields, field f at bits [f*bits, f*bits +
    bits) (lowest first), laid out along `dim` (0 or 1) of the 2-D `words`: word w's field f
    becomes position w * (32 // bits) + f. Returns uint8."""
    if 32 % bits:
        raise FormatError(f"cannot split 32-bit words into {bits}-bit fields")
    per = 32 // bits
    mask = (1 << bits) - 1
    w = words if dim == 1 else words.t()
    rows, cols = w.shape
    out = torch.empty(rows, cols, per, dtype=torch.uint8, device=w.device)
    for f in range(per):
        # Arithmetic right shift on int32: the sign bits that come in are masked away.
        out[:, :, f] = ((w >> (f * bits)) & mask).to(torch.uint8)
    out = out.reshape(rows, cols * per)
    return out if dim == 1 else out.t()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Contract packing of unsigned codes [N, K] (uint8, each < 2**bits): bits 8 one a byte,
    bits 4 two a byte over the flat index, element 2j in the high nibble of byte j."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.contiguous()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).contiguous()


def chunk_size(col_group: torch.Tensor, K: int) -> int:
    """The largest g dividing K such that every run of g consecutive columns (of the stored
    column order) lies in one source group: then scale[n, j // g] = source_scale[n, col_group[j]]
    represents the source grouping exactly. col_group: int64 [K]."""
    g = K
    if K > 1:
        starts = torch.nonzero(col_group[1:] != col_group[:-1]).flatten() + 1
        for b in starts.tolist():
            g = math.gcd(g, b)
            if g == 1:
                break
    return g


def expand_groups(
    per_group: torch.Tensor, col_group: torch.Tensor, g: int, name: str
) -> torch.Tensor:
    """fp32 [N * K // g] from a source table [N, G] indexed by col_group[j] for chunk j // g."""
    K = col_group.numel()
    idx = col_group[::g]  # the source group of each chunk (constant within it)
    out = per_group.index_select(1, idx.to(per_group.device))
    if out.shape[1] != K // g:
        raise FormatError(f"{name}: internal group mapping error")
    return out.float().contiguous().reshape(-1)


def perm_from_group_index(g_idx: torch.Tensor, groups: int, name: str):
    """(perm or None, col_group in stored order) for an input-column -> group map (GPTQ g_idx).

    With act-order (desc_act) the map is not monotonic: sorting the columns by group (stable)
    makes every group a run of columns; perm[j] is the original column stored at position j."""
    g_idx = g_idx.to(torch.int64)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise FormatError(
            f"{name}: values must lie in [0, {groups}) (one per group of the scales), "
            f"got range [{int(g_idx.min())}, {int(g_idx.max())}]"
        )
    if g_idx.numel() < 2 or bool((g_idx[1:] >= g_idx[:-1]).all()):
        return None, g_idx
    perm = torch.sort(g_idx, stable=True).indices
    return perm, g_idx[perm]


FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def parse_group_size(qconfig: dict, *keys: str) -> int:
    """quantization_config's group size (first of `keys` present, default 128): a positive int,
    or -1 for one group per output channel."""
    key = next((k for k in keys if k in qconfig), keys[0])
    g = qconfig.get(key, 128)
    if not isinstance(g, int) or isinstance(g, bool) or (g != -1 and g < 1):
        raise FormatError(
            f"quantization_config.{key}={g!r}: must be a positive int or -1 (per channel)"
        )
    return g


def grouped_weight(
    name: str,
    stash: dict,
    codes: torch.Tensor,
    scale_rows: torch.Tensor,
    zero_rows: torch.Tensor,
    col_group: torch.Tensor,
    bits: int,
    perm: torch.Tensor | None = None,
) -> AffineWeight:
    """The AffineWeight of codes [N, K] (stored column order) whose column j belongs to source
    group col_group[j], with per-row source tables scale_rows / zero_rows [N, G]; the optional
    bias comes from the stash (checked)."""
    N, K = codes.shape
    g = chunk_size(col_group, K)
    bias = stash.get("bias")
    if bias is not None:
        bias = check_tensor(name + "bias", bias, FLOATS, (N,))
    return AffineWeight(
        packed=pack_codes(codes.contiguous(), bits),
        scales=expand_groups(scale_rows, col_group, g, name + "scales"),
        zeros=expand_groups(zero_rows.float(), col_group, g, name + "zeros"),
        bits=bits,
        group_size=g,
        shape=(N, K),
        perm=perm,
        bias=bias,
    )
