"""Quantized layers with bitsandbytes.nn's names, arguments and state-dict keys."""

from lowbit.nn.affine import LinearAffine
from lowbit.nn.embedding import (
    Embedding,
    Embedding4bit,
    Embedding8bit,
    EmbeddingFP4,
    EmbeddingNF4,
    StableEmbedding,
)
from lowbit.nn.modules import Linear4bit, Linear8bitLt, LinearFP4, LinearNF4
from lowbit.nn.parameters import Int8Params, Params4bit

__all__ = [
    "Embedding",
    "Embedding4bit",
    "Embedding8bit",
    "EmbeddingFP4",
    "EmbeddingNF4",
    "Int8Params",
    "Linear4bit",
    "Linear8bitLt",
    "LinearAffine",
    "LinearFP4",
    "LinearNF4",
    "Params4bit",
    "StableEmbedding",
]
