"""The "lowbit" quantizer for Transformers (5.x loading API).

With it registered (lowbit does so on import, see lowbit.integrations),

    AutoModelForCausalLM.from_pretrained(path, quantization_config=LowbitConfig(load_in_4bit=True))

swaps every eligible nn.Linear for a lowbit layer on the meta device, then quantizes each weight
as Transformers streams it from the checkpoint, so a float copy of the whole model never exists.
`save_pretrained` writes bitsandbytes' key layout and a config.json whose quantization_config says
quant_method "lowbit" (never load_in_4bit/load_in_8bit, which Transformers would route to
bitsandbytes); `from_pretrained` of that directory loads the codes as stored, without
re-quantizing.

The structure follows Transformers' own bitsandbytes quantizer (quantizer_bnb_4bit.py and
integrations/bitsandbytes.py), since lowbit's layers and parameters mirror bitsandbytes' classes.
"""

from __future__ import annotations

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit import nn as lnn
from lowbit.config import LowbitConfig as _LowbitConfig

QUANT_METHOD = "lowbit"
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = ["QUANT_METHOD", "LowbitConfig", "LowbitHfQuantizer", "register"]


if issubclass(_LowbitConfig, QuantizationConfigMixin):
    LowbitConfig = _LowbitConfig
else:

    class LowbitConfig(_LowbitConfig, QuantizationConfigMixin):
        """lowbit.LowbitConfig as a Transformers QuantizationConfigMixin.

        register_quantization_config only accepts mixin subclasses, and lowbit.LowbitConfig is
        one only when Transformers was importable as lowbit.config loaded (Transformers is an
        optional dependency). lowbit.LowbitConfig's own methods come first in the MRO; the mixin
        adds what Transformers calls besides (to_json_string, to_diff_dict, update). The class
        keeps the name LowbitConfig because Transformers compares config classes by name when a
        config passed to from_pretrained meets the one stored in config.json.
        """


def _is_4bit(config) -> bool:
    return not getattr(config, "load_in_8bit", False)


def _source_is_conv1d(module) -> bool:
    # GPT-2 style Conv1D stores its weight as [in, out]; the checkpoint keeps that orientation.
    source = getattr(module, "source_cls", None)
    return isinstance(source, type) and issubclass(source, Conv1D)


def quantized_modules_in_checkpoint(checkpoint_files) -> set[str] | None:
    """Names of the modules a pre-quantized checkpoint stores quantized (they own a
    `weight.quant_state.*` or an `SCB` key); None when the files cannot be listed cheaply."""
    from safetensors import safe_open

    if not checkpoint_files:
        return None
    names = set()
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            return None
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if ".weight.quant_state." in key:
                    names.add(key.partition(".weight.quant_state.")[0])
                elif key.endswith(".SCB"):
                    names.add(key[: -len(".SCB")])
    return names


def _in_checkpoint(name: str, stored: set[str], prefix: str) -> bool:
    # Checkpoint keys may carry the base-model prefix ("model.") that module names lack, or not.
    if name in stored or (prefix and f"{prefix}.{name}" in stored):
        return True
    return bool(prefix) and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in stored


def replace_with_lowbit_linear(
    model, modules_to_not_convert, config, pre_quantized: bool, stored: set[str] | None = None
):
    """Swap every nn.Linear / Conv1D not matched by `modules_to_not_convert` (Transformers'
    should_convert_module rules: prefix, regex or suffix) for an empty lowbit layer on meta.

    `stored` (pre-quantized loading): the modules the checkpoint holds quantized. It overrides
    the skip list, so a checkpoint written with other skip rules (bitsandbytes replaces the
    default skips by the user's list; lowbit adds to them) still loads layer for layer.
    """
    four_bit = _is_4bit(config)
    prefix = getattr(model, "base_model_prefix", "") or ""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not (type(module) is torch.nn.Linear or isinstance(module, Conv1D)):
            continue
        if stored is not None:
            if not _in_checkpoint(name, stored, prefix):
                continue
        elif not should_convert_module(name, modules_to_not_convert):
            continue
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
        else:
            in_features, out_features = module.in_features, module.out_features
        with torch.device("meta"):
            if four_bit:
                new = lnn.Linear4bit(
                    in_features,
                    out_features,
                    bias=module.bias is not None,
                    compute_dtype=config.bnb_4bit_compute_dtype,
                    compress_statistics=config.bnb_4bit_use_double_quant,
                    quant_type=config.bnb_4bit_quant_type,
                    quant_storage=config.bnb_4bit_quant_storage,
                )
                storage = config.bnb_4bit_quant_storage
            else:
                new = lnn.Linear8bitLt(
                    in_features,
                    out_features,
                    bias=module.bias is not None,
                    has_fp16_weights=config.llm_int8_has_fp16_weight,
                    threshold=config.llm_int8_threshold,
                )
                storage = torch.int8
            if pre_quantized:
                # The loader casts each checkpoint tensor to the dtype of the meta parameter it
                # fills; integer codes must arrive as integers, not as the model's float dtype.
                new.weight.data = new.weight.data.to(storage)
        new.source_cls = type(module)
        new.requires_grad_(False)
        model.set_submodule(name, new)
        replaced += 1
    return replaced


class LowbitQuantize(ConversionOps):
    """On-the-fly quantization: one float weight from the checkpoint -> a quantized parameter."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        result = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, name)
            if _source_is_conv1d(module):
                value = value.T
            old = model.get_parameter_or_buffer(name)
            if isinstance(module, lnn.Linear4bit):
                kwargs4 = {k: v for k, v in old.__dict__.items() if k != "quant_state"}
                kwargs4["bnb_quantized"] = False
                param = lnn.Params4bit(value, requires_grad=False, **kwargs4)
            else:
                has_fp16 = getattr(old, "has_fp16_weights", False)
                param = lnn.Int8Params(value, requires_grad=has_fp16, has_fp16_weights=has_fp16)
            # The first move to a real device quantizes (the parameters' bitsandbytes contract).
            result[name] = param.to(value.device)
            module._is_hf_initialized = True
        return result


class LowbitDeserialize(ConversionOps):
    """Pre-quantized loading: gather `weight` and its `weight.*` / `SCB` companions and load them
    into the layer exactly as stored (no re-quantization)."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        # The "weight" pattern also matches every float weight (norms, embeddings): pass those on.
        if len(input_dict) == 1:
            return input_dict
        tensors = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        # The layer's own loader checks every key against the others (shapes, scale counts,
        # quant-state JSON) and raises naming the bad one; Transformers adds the layer's name.
        module.load_state_dict(tensors, strict=False, assign=True)
        module._is_hf_initialized = True
        return {"weight": module.weight}


_PREQUANTIZED_4BIT_KEYS = [
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_map",
    "weight.absmax",
    "weight.quant_state.bitsandbytes__nf4",
    "weight.quant_state.bitsandbytes__fp4",
    "weight",
]
_PREQUANTIZED_8BIT_KEYS = ["SCB", "weight_format", "weight"]


class LowbitHfQuantizer(HfQuantizer):
    """Quantizes nn.Linear layers to LLM.int8(), NF4 or FP4 with lowbit's layers."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []

    @property
    def _four_bit(self) -> bool:
        return _is_4bit(self.quantization_config)

    def validate_environment(self, *args, **kwargs):
        if getattr(self.quantization_config, "bits", 4) is None:
            raise ValueError(
                "lowbit: the quantization config selects neither load_in_4bit nor load_in_8bit"
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "lowbit: quantized layers cannot be offloaded to disk; give them a device "
                "(cpu or cuda) in device_map"
            )

    def update_device_map(self, device_map):
        if device_map is None:
            from lowbit import _C

            on_gpu = torch.cuda.is_available() and getattr(_C, "with_cuda", False)
            device_map = {"": torch.cuda.current_device() if on_gpu else "cpu"}
        return device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, (lnn.Linear4bit, lnn.Linear8bitLt)) and name == "weight"

    def param_element_size(self, model, param_name: str, param) -> float:
        if self.param_needs_quantization(model, param_name):
            return 0.5 if self._four_bit else 1
        return super().param_element_size(model, param_name, param)

    def adjust_max_memory(self, max_memory):
        # Quantizing needs a float copy of one weight next to its codes.
        return {key: val * 0.90 for key, val in max_memory.items()}

    def _process_model_before_weight_loading(
        self, model, device_map=None, checkpoint_files=None, **kwargs
    ):
        config = self.quantization_config
        # lowbit's rule (as lowbit.quantize_model): the user's skip list adds to the default
        # skips (lm_head, tied output embeddings) instead of replacing them.
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model,
            config.llm_int8_skip_modules,
            model._keep_in_fp32_modules,
            add_default_skips=True,
        )
        if config.llm_int8_enable_fp32_cpu_offload and isinstance(device_map, dict):
            self.modules_to_not_convert += [k for k, v in device_map.items() if v == "cpu"]
        stored = quantized_modules_in_checkpoint(checkpoint_files) if self.pre_quantized else None
        replace_with_lowbit_linear(
            model, self.modules_to_not_convert, config, self.pre_quantized, stored=stored
        )
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # Transformers keeps the converters a load used and replays them in reverse when saving;
        # ours have no inverse, and none is needed: the layers' state_dict already has the
        # on-disk layout.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [
                c
                for c in conversions
                if not any(isinstance(op, LowbitDeserialize) for op in getattr(c, "operations", ()))
            ]
        model.is_loaded_in_lowbit = True
        from lowbit.loading.model import attach_save_pretrained

        attach_save_pretrained(model)  # model.save_pretrained(..., format="bitsandbytes")
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        # QLoRA: frozen quantized layers pass gradients to their inputs (and to LoRA adapters).
        return True

    def get_quantize_ops(self):
        return LowbitQuantize(self)

    def get_weight_conversions(self):
        if not self.pre_quantized:
            return []
        keys = _PREQUANTIZED_4BIT_KEYS if self._four_bit else _PREQUANTIZED_8BIT_KEYS
        return [
            WeightConverter(
                source_patterns=keys, target_patterns="weight", operations=[LowbitDeserialize(self)]
            )
        ]

    def _dequantize(self, model, dtype=None):
        # model.config.dtype, Transformers' default here, may be a name ("float32").
        if isinstance(dtype, str):
            dtype = _FLOAT_DTYPES.get(dtype.removeprefix("torch."))
        for name, module in list(model.named_modules()):
            if not isinstance(module, (lnn.Linear4bit, lnn.Linear8bitLt)):
                continue
            weight = module.dequantize(dtype)
            new = torch.nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta"
            )
            new.weight = torch.nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                new.bias = torch.nn.Parameter(
                    module.bias.data.to(weight.dtype), requires_grad=False
                )
            model.set_submodule(name, new)
        return model


def register() -> None:
    """Register the config class and the quantizer under "lowbit" (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)
