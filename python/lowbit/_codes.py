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
