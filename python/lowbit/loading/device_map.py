"""Device maps: 'cpu', 'auto' (through Accelerate) or explicit, for from_pretrained."""

from __future__ import annotations

import logging

import torch

from lowbit.nn.replace import (
    linear_layers_to_quantize,
)

logger = logging.getLogger("lowbit")


_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def is_accelerator(device) -> bool:
    d = str(device)
    return d not in ("cpu", "disk", "meta")


def _normalize_device(d):
    if isinstance(d, int):
        return f"cuda:{d}"
    return str(d)


def _infer_device_map(model, device_map, config, dtype, skip, max_memory):
    try:
        from accelerate import infer_auto_device_map
        from accelerate.utils import CustomDtype, get_balanced_memory
    except ImportError:
        if torch.cuda.is_available():
            raise ImportError(f"device_map={device_map!r} needs accelerate installed") from None
        return {"": "cpu"}
    special = {}
    if config is not None and config.bits is not None:
        small = CustomDtype.INT4 if config.bits == 4 else torch.int8
        special = {f"{n}.weight": small for n in linear_layers_to_quantize(model, skip)}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    kwargs = {"no_split_module_classes": no_split, "dtype": dtype, "special_dtypes": special}
    if device_map != "sequential" and max_memory is None:
        max_memory = get_balanced_memory(
            model, low_zero=device_map == "balanced_low_0", max_memory=max_memory, **kwargs
        )
    return dict(infer_auto_device_map(model, max_memory=max_memory, **kwargs))


def device_lookup(device_map: dict[str, str]):
    entries = sorted(device_map.items(), key=lambda kv: -len(kv[0]))

    def device_of(module_name: str) -> str:
        for prefix, dev in entries:
            if prefix == "" or module_name == prefix or module_name.startswith(prefix + "."):
                return dev
        raise ValueError(
            f"device_map does not place module {module_name!r} (add it or an ancestor)"
        )

    return device_of


def resolve_device_map(model, device_map, config, dtype, skip, max_memory):
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, str) and device_map in _AUTO_MAPS:
        return _infer_device_map(model, device_map, config, dtype, skip, max_memory)
    if isinstance(device_map, (str, int, torch.device)):
        return {"": _normalize_device(device_map)}
    if isinstance(device_map, dict):
        return {k: _normalize_device(v) for k, v in device_map.items()}
    raise TypeError(f"device_map must be 'cpu', 'auto', a device or a dict, got {device_map!r}")
