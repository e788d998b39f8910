"""Quantized layers with bitsandbytes.nn's names, arguments and state-dict keys."""

from lowbit.nn.affine import LinearAffine
from lowbit.nn.modules import Linear4bit, Linear8bitLt, LinearFP4, LinearNF4
from lowbit.nn.parameters import Int8Params, Params4bit

__all__ = [
    "Int8Params",
    "Linear4bit",
    "Linear8bitLt",
    "LinearAffine",
    "LinearFP4",
    "LinearNF4",
    "Params4bit",
]
