"""The code tables of every format (DESIGN.md, "Formats"); one place for all of them."""

from __future__ import annotations

import torch

# NF4 (QLoRA): by nibble value 0..15.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 as in bitsandbytes: bit 3 is the sign, magnitudes [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12.
FP4_CODE = tuple(
    v / 12.0
    for v in (
        0.0,
        0.0625,
        8.0,
        12.0,
        4.0,
        6.0,
        2.0,
        3.0,
        -0.0,
        -0.0625,
        -8.0,
        -12.0,
        -4.0,
        -6.0,
        -2.0,
        -3.0,
    )
)

QUANT_TYPES_4BIT = ("nf4", "fp4")


def get_4bit_type(typename: str, device=None, blocksize: int = 64) -> torch.Tensor:
    """The 16 values of a 4-bit code, by nibble (bitsandbytes.functional.get_4bit_type)."""
    if typename == "nf4":
        values = NF4_CODE
    elif typename == "fp4":
        values = FP4_CODE
    else:
        raise ValueError(f"typename must be 'nf4' or 'fp4', got {typename!r}")
    return torch.tensor(values, dtype=torch.float32, device=device)


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> torch.Tensor:
    """The dynamic (exponent + linear fraction) 8-bit map of Dettmers et al., sorted ascending.

    For each exponent i the fraction bits split [0.1, 1] into equal steps whose midpoints are scaled
    by 10**(i - (max_exponent_bits - 1)); 0 and 1 complete the table. Identical values to
    bitsandbytes.functional.create_dynamic_map.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = (
            10**0
        )  # the last exponent's scale: 10**(-(max_exponent_bits - 1) + i) at i = max_exponent_bits - 1
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data.append(0)
    data.append(1.0)
    if len(data) > 2**total_bits:
        raise ValueError(
            f"the map has {len(data)} values, more than 2**total_bits = {2**total_bits}"
        )
    data += [0] * (2**total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


# ---- 256-entry code maps (bitsandbytes.functional's map creators) --------------------------------
#
# Each returns 256 fp32 values, bit-identical to bitsandbytes' function of the same name and
# arguments: a map with fewer than 2**8 distinct entries is padded with zeros, as blockwise 8-bit
# quantization indexes a full byte.


def create_linear_map(
    signed: bool = True, total_bits: int = 8, add_zero: bool = True
) -> torch.Tensor:
    """Evenly spaced values from -1 (0 when unsigned) to 1, zero-padded in the middle to 256.

    A signed map with a zero (add_zero, or fewer than 8 bits) holds 2**total_bits - 1 points so that
    0 is one of them; the padding zeros go between the negative and the positive halves.
    """
    _check_bits("create_linear_map", total_bits)
    n = 2**total_bits
    if signed and (add_zero or total_bits < 8):
        n -= 1
    values = torch.linspace(-1.0 if signed else 0.0, 1.0, n, dtype=torch.float32)
    pad = 256 - n
    if pad == 0:
        return values
    half = n // 2
    return torch.cat([values[:half], torch.zeros(pad), values[half:]])


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """NormalFloat: quantiles of N(0, 1) scaled to [-1, 1] (its 16 nonzero-padded values are NF4).

    The positive side takes the normal quantiles at 8 (use_extra_value) or 7 evenly spaced
    probabilities from `offset` down to (but excluding) 0.5, the negative side 7 of them; zeros pad
    the map to 256 (one of them is NF4's 0). The probabilities are spaced in fp32 and the quantiles
    taken in fp64 (torch.special.ndtri, the inverse normal CDF, as scipy's norm.ppf), then rounded
    to fp32 and divided by the largest.
    """
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"create_normal_map: offset must be a number, got {type(offset).__name__}")
    if not 0.5 < offset < 1.0:
        raise ValueError(f"create_normal_map: offset must be in (0.5, 1), got {offset}")

    def quantiles(count: int) -> torch.Tensor:
        p = torch.linspace(offset, 0.5, count + 1, dtype=torch.float32)[:-1]
        return torch.special.ndtri(p.double()).float()

    positive = quantiles(8 if use_extra_value else 7)
    negative = -quantiles(7)
    zeros = torch.zeros(256 - positive.numel() - negative.numel())
    values = torch.cat([positive, zeros, negative]).sort().values
    return values / values.max()


def create_fp8_map(
    signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8
) -> torch.Tensor:
    """A small float format's values, sorted and divided by the largest; zero-padded to 256.

    For exponent field e (bias b = 2**(exponent_bits-1)) and fraction bits f: e = 0 is subnormal,
    0.f * 2**-b; e > 0 is (1.f) * 2**(b + 1 - e) (bitsandbytes' convention: the exponent counts
    down). create_fp8_map(True, 2, 1, 4) holds FP4's values except the smallest magnitude: 0.25/12
    there, 0.0625/12 in the FP4 code that 4-bit quantization uses (FP4_CODE, as bitsandbytes).
    """
    for name, v, low in (
        ("exponent_bits", exponent_bits, 1),
        ("precision_bits", precision_bits, 0),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"create_fp8_map: {name} must be an int >= {low}, got {v!r}")
    _check_bits("create_fp8_map", total_bits)
    if exponent_bits + precision_bits + int(bool(signed)) != total_bits:
        raise ValueError(
            f"create_fp8_map: exponent_bits + precision_bits + sign bit must equal total_bits "
            f"({exponent_bits} + {precision_bits} + {int(bool(signed))} != {total_bits})"
        )
    bias = 2 ** (exponent_bits - 1)
    values: list[float] = []
    for e in range(2**exponent_bits):
        for f in range(2**precision_bits):
            # fraction bits most significant first: f / 2**precision_bits
            frac = f / 2**precision_bits
            v = frac * 2.0**-bias if e == 0 else (1.0 + frac) * 2.0 ** (bias + 1 - e)
            values.append(v)
            if signed:
                values.append(-v)
    values += [0.0] * (256 - len(values))
    values.sort()
    code = torch.tensor(values, dtype=torch.float32)
    return code / code.max()


def _check_bits(fn: str, total_bits) -> None:
    if isinstance(total_bits, bool) or not isinstance(total_bits, int) or not 1 <= total_bits <= 8:
        raise ValueError(f"{fn}: total_bits must be an int in 1..8, got {total_bits!r}")
