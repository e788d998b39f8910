"""Embeddings with bitsandbytes.nn's names, constructor arguments and forward results.

- `Embedding`, `StableEmbedding`: float embeddings (Xavier-uniform init; StableEmbedding adds a
  LayerNorm computed in the default dtype).
- `Embedding8bit`: LLM.int8() rows, int8 codes [num_embeddings, embedding_dim] with one fp32
  absmax per row (`SCB`); a lookup gathers the rows' codes and scales and dequantizes only those.
- `Embedding4bit(quant_type=...)`, `EmbeddingNF4`, `EmbeddingFP4`: NF4/FP4 blockwise codes over
  the flattened table; when embedding_dim is a multiple of the block size, a lookup gathers the
  rows' packed bytes and scales and dequantizes only those.

As lowbit's linear layers, the quantized embeddings quantize on the first move (`.to`, `.cpu`,
`.cuda`), on `quantize_()` or on the first forward, and they save and load through state_dict in
the linear layers' key layout (bitsandbytes raises NotImplementedError there): `weight` + `SCB` +
`weight_format` for 8-bit, `weight` + `weight.absmax`, `weight.quant_map`, ... +
`weight.quant_state.bitsandbytes__{nf4,fp4}` for 4-bit. A float nn.Embedding state dict loads too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as torch_F
from torch import nn

from lowbit import functional as F
from lowbit._codes import QUANT_TYPES_4BIT
from lowbit.nn._state_dict import load_4bit, load_8bit
from lowbit.nn.modules import _run_pre_hooks, _target_float_dtype
from lowbit.nn.parameters import Int8Params, Packed4bitWeight, Params4bit

__all__ = [
    "Embedding",
    "StableEmbedding",
    "Embedding8bit",
    "Embedding4bit",
    "EmbeddingNF4",
    "EmbeddingFP4",
]

_ops = torch.ops.lowbit

_STORAGE_DTYPES = (
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.float16,
    torch.bfloat16,
    torch.float32,
)


def _xavier_reset(emb: nn.Embedding) -> None:
    # bitsandbytes' float embeddings start from Xavier-uniform weights, the padding row zeroed.
    nn.init.xavier_uniform_(emb.weight)
    if emb.padding_idx is not None:
        with torch.no_grad():
            emb.weight[emb.padding_idx].fill_(0)


class Embedding(nn.Embedding):
    """nn.Embedding initialised as bitsandbytes.nn.Embedding (Xavier uniform)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: torch.Tensor | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            _weight,
            device=device,
            dtype=dtype,
        )
        # As bitsandbytes: an 8-bit optimizer keeps this table's states in 32 bits (rare rows get
        # rare, large updates that 8-bit states round badly). The manager holds the module weakly.
        from lowbit.optim import GlobalOptimManager

        GlobalOptimManager.get_instance().register_module_override(
            self, "weight", {"optim_bits": 32}
        )

    def reset_parameters(self) -> None:
        _xavier_reset(self)


class StableEmbedding(Embedding):
    """An embedding followed by a LayerNorm computed in torch's default dtype, the output cast back
    to the weight's dtype (bitsandbytes.nn.StableEmbedding)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: torch.Tensor | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            _weight,
            device=device,
            dtype=dtype,
        )
        self.norm = nn.LayerNorm(embedding_dim, device=device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        emb = super().forward(input).to(torch.get_default_dtype())
        norm = self.norm
        # The norm's parameters join the default-dtype computation too, so a module cast with
        # .half() / .to(bfloat16) still runs (bitsandbytes raises a mixed-dtype error there).
        weight = None if norm.weight is None else norm.weight.to(emb.dtype)
        bias = None if norm.bias is None else norm.bias.to(emb.dtype)
        out = torch_F.layer_norm(emb, norm.normalized_shape, weight, bias, norm.eps)
        return out.to(self.weight.dtype)


def _check_indices(module: nn.Module, input) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(
            f"{type(module).__name__}: input must be a tensor of indices, got {type(input).__name__}"
        )
    if input.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{type(module).__name__}: input must hold int64 or int32 indices, got {input.dtype}"
        )


class _QuantizedEmbedding(nn.Embedding):
    """What the quantized embeddings share: the linear layers' state-dict loaders (which see the
    table as a [num_embeddings, embedding_dim] weight without bias) and device/dtype moves."""

    bias = None  # the linear layers' loaders handle an optional bias; an embedding has none

    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @property
    def in_features(self) -> int:
        return self.embedding_dim

    def _apply(self, fn, recurse=True):
        new_dtype = _target_float_dtype(fn)
        super()._apply(fn, recurse)
        if new_dtype is not None:
            self.dtype = new_dtype  # .half() & co. change the output dtype, never the codes
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dtype={self.dtype}, quantized={self.is_quantized}"


class Embedding8bit(_QuantizedEmbedding):
    """LLM.int8() embedding: int8 rows with one fp32 absmax per row; output in `dtype` (the
    weight's dtype at construction)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.dtype
        self.weight = Int8Params(self.weight.data, has_fp16_weights=False, requires_grad=False)

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.weight, Int8Params) and self.weight.has_codes

    def quantize_(self, device=None) -> Embedding8bit:
        """Quantize the float table in place (on `device`, default its own); no-op once done."""
        if not self.is_quantized:
            self.weight._quantize(self.weight.device if device is None else device)
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The table as floats [num_embeddings, embedding_dim] (`self.dtype` by default)."""
        if not self.is_quantized:
            return self.weight.data.to(dtype or self.dtype)
        return F.int8_vectorwise_dequant(self.weight.data, self.weight.SCB).to(dtype or self.dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        w = self.weight
        scb = getattr(w, "SCB", None)
        if scb is not None and scb.device != w.device:
            w.SCB = scb.to(w.device)  # scales follow the codes and stay fp32
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_quantized:
            scb = self.weight.SCB
            destination[prefix + "SCB"] = scb if keep_vars else scb.detach()
            destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs
    ):
        _run_pre_hooks(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs)
        load_8bit(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_indices(self, input)
        if not self.is_quantized:
            self.quantize_()
        w = self.weight
        # Gather the rows' codes and their scales, then dequantize only those rows.
        codes = torch_F.embedding(input, w.data)
        scales = torch_F.embedding(input, w.SCB.view(-1, 1)).reshape(-1)
        return F.int8_vectorwise_dequant(codes, scales).to(self.dtype)


class Embedding4bit(Packed4bitWeight, _QuantizedEmbedding):
    """NF4/FP4 embedding (QLoRA's blockwise 4-bit codes, no double quantization by default);
    output in `dtype` (the weight's dtype at construction)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype=None,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device=None,
        blocksize: int = 64,
        compress_statistics: bool = False,
    ):
        if quant_type not in QUANT_TYPES_4BIT:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
        if quant_storage not in _STORAGE_DTYPES:
            raise TypeError(
                f"quant_storage must be one of {[str(d) for d in _STORAGE_DTYPES]}, got "
                f"{quant_storage!r}"
            )
        if isinstance(blocksize, bool) or not isinstance(blocksize, int):
            raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
        if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize}")
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.dtype
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The table as floats [num_embeddings, embedding_dim] (`self.dtype` by default)."""
        if not self.is_quantized:
            return self.weight.data.to(dtype or self.dtype)
        return F.dequantize_4bit(self.weight.data, self.quant_state).to(dtype or self.dtype)

    def _apply(self, fn, recurse=True):
        w = self.weight
        # Packed bytes in a float quant_storage must only move, never be cast: view them as uint8.
        storage = w.dtype if self.is_quantized and w.dtype != torch.uint8 else None
        if storage is not None:
            w.data = w.data.view(torch.uint8)
        super()._apply(fn, recurse)
        w = self.weight
        if storage is not None:
            w.data = w.data.view(storage)
        qs = getattr(w, "quant_state", None)
        if qs is not None and qs.absmax.device != w.device:
            qs.to(w.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        qs = self.quant_state
        if self.is_quantized and qs is not None:
            for k, v in qs.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs
    ):
        _run_pre_hooks(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs)
        load_4bit(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_indices(self, input)
        if not self.is_quantized:
            self.quantize_()
        qs = self.quant_state
        dim = self.embedding_dim
        if dim % qs.blocksize == 0:
            # Each row is whole blocks (and an even number of codes, blocksize >= 32): gather the
            # rows' packed bytes [.., dim/2] and block scales [.., dim/blocksize], then decode only
            # those. Byte j of a row holds its codes 2j (high nibble) and 2j+1 (low nibble).
            packed = self.weight.data.view(torch.uint8).reshape(self.num_embeddings, dim // 2)
            absmax = F.decode_absmax(qs).reshape(self.num_embeddings, dim // qs.blocksize)
            rows = torch_F.embedding(input, packed).reshape(-1, 1)
            scales = torch_F.embedding(input, absmax).reshape(-1)
            out = _ops.dequantize_4bit(
                rows, scales, qs.blocksize, qs.quant_type, [*input.shape, dim], qs.dtype
            )
        else:
            # Rows straddle blocks: decode the whole table (bitsandbytes does the same).
            out = torch_F.embedding(input, F.dequantize_4bit(self.weight.data, qs))
        return out.to(self.dtype)


class EmbeddingFP4(Embedding4bit):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype=None,
        quant_storage: torch.dtype = torch.uint8,
        device=None,
        blocksize: int = 64,
        compress_statistics: bool = False,
    ):
        super().__init__(
            num_embeddings,
            embedding_dim,
            dtype=dtype,
            quant_type="fp4",
            quant_storage=quant_storage,
            device=device,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
        )


class EmbeddingNF4(Embedding4bit):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype=None,
        quant_storage: torch.dtype = torch.uint8,
        device=None,
        blocksize: int = 64,
        compress_statistics: bool = False,
    ):
        super().__init__(
            num_embeddings,
            embedding_dim,
            dtype=dtype,
            quant_type="nf4",
            quant_storage=quant_storage,
            device=device,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
        )
