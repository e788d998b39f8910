"""from_pretrained: build on meta, stream the checkpoint, quantize each tensor as it arrives."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lowbit.config import LowbitConfig
from lowbit.formats import METHODS as FORMAT_METHODS
from lowbit.formats import is_affine_method, quant_method, reader_for
from lowbit.loading import affine as affine_loading
from lowbit.loading.device_map import device_lookup, is_accelerator, resolve_device_map
from lowbit.loading.files import checkpoint_files, count_tensors, iter_tensors
from lowbit.loading.model import as_config, progress_bar, replace_linear_layers, skip_list
from lowbit.loading.tensors import TensorLoader
from lowbit.nn.affine import LinearAffine
from lowbit.nn.replace import (
    QUANTIZED_LINEAR_TYPES,
    embeddings_to_quantize,
    make_quantized_embedding,
    set_submodule,
)

logger = logging.getLogger("lowbit")


def _resolve_dtype(torch_dtype, hf_config) -> torch.dtype | None:
    """None / "auto": the checkpoint's dtype (config.json "dtype" / "torch_dtype" when given)."""
    if torch_dtype is None or torch_dtype == "auto":
        saved = getattr(hf_config, "dtype", None)
        # Transformers >= 4.56 reads config.json's "torch_dtype" into `dtype` and keeps
        # `torch_dtype` only as a property that logs a deprecation warning on every read: read it
        # only where it is still a plain attribute (older Transformers).
        if saved is None and not isinstance(
            getattr(type(hf_config), "torch_dtype", None), property
        ):
            saved = getattr(hf_config, "torch_dtype", None)
        torch_dtype = saved
        if torch_dtype is None:
            return None
    if isinstance(torch_dtype, str):
        name = torch_dtype.removeprefix("torch.")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"torch_dtype {torch_dtype!r} is not a torch dtype name")
        torch_dtype = getattr(torch, name)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise TypeError(f"torch_dtype must be a floating torch.dtype, got {torch_dtype!r}")
    return torch_dtype


def _model_class(hf_config):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = list(getattr(hf_config, "architectures", None) or [])
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if any(a in causal or a.endswith("ForCausalLM") for a in archs):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _requested_config(load_in_8bit, load_in_4bit, quantization_config) -> LowbitConfig | None:
    if quantization_config is not None:
        if load_in_8bit or load_in_4bit:
            raise ValueError(
                "pass either quantization_config or load_in_8bit/load_in_4bit, not both"
            )
        return as_config(quantization_config)
    if load_in_8bit or load_in_4bit:
        return LowbitConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    return None


def _merge_saved(saved: LowbitConfig, requested: LowbitConfig | None) -> LowbitConfig:
    """A pre-quantized checkpoint keeps its format; only loading attributes may change."""
    if requested is None or requested.bits is None:
        return saved
    same = requested.bits == saved.bits and (
        saved.bits != 4
        or (requested.bnb_4bit_quant_type, requested.bnb_4bit_use_double_quant)
        == (saved.bnb_4bit_quant_type, saved.bnb_4bit_use_double_quant)
    )
    if not same:
        raise ValueError(
            f"the checkpoint is already quantized ({saved.quantization_method()}, double quant "
            f"{saved.bnb_4bit_use_double_quant}); it cannot be loaded as "
            f"{requested.quantization_method()} (double quant {requested.bnb_4bit_use_double_quant})"
        )
    merged = saved.to_dict()
    for k, v in requested.get_loading_attributes().items():
        merged[k] = v if not isinstance(v, torch.dtype) else str(v).removeprefix("torch.")
    return LowbitConfig.from_dict(merged)


def _saved_quant_config(hf_config) -> LowbitConfig | None:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qd = qc if isinstance(qc, dict) else qc.to_dict()
    method = getattr(qd.get("quant_method"), "value", qd.get("quant_method"))
    if method is None and any(k in qd for k in ("load_in_4bit", "load_in_8bit", "bits")):
        method = (
            "bitsandbytes"  # diff-serialised BitsAndBytesConfig: defaults (and method) left out
        )
    if method not in ("lowbit", "bitsandbytes"):
        raise ValueError(
            f"cannot load a checkpoint quantized with {method!r}; lowbit reads lowbit and "
            f"bitsandbytes checkpoints and the affine formats {sorted(FORMAT_METHODS)}"
        )
    return LowbitConfig.from_dict(qd)


def from_pretrained(
    path,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    quantization_config=None,
    device_map=None,
    torch_dtype=None,
    skip_modules=None,
    *,
    allow_pickle: bool = False,
    max_memory=None,
    offload_folder=None,
    model_class=None,
    trust_remote_code: bool = False,
    progress: bool | None = None,
    quantize_embeddings: bool = False,
):
    """Load a Transformers-format directory quantized, streaming it tensor by tensor.

    The model class comes from config.json's `architectures` (AutoModelForCausalLM for causal LMs,
    else AutoModel; `model_class` overrides). A checkpoint already quantized by lowbit or by
    Transformers + bitsandbytes loads as saved; a GPTQ, AWQ, compressed-tensors or HQQ checkpoint
    (config.json's quantization_config.quant_method) loads into LinearAffine layers, converted
    once (lowbit.formats; none of those libraries is imported). Only safetensors are read unless
    allow_pickle=True (then torch.load(weights_only=True)).

    device_map: None/"cpu", a device, "auto" (through accelerate), or a {module prefix: device}
    dict. With an accelerator in the map, modules mapped to "cpu"/"disk" need
    llm_int8_enable_fp32_cpu_offload=True and then stay unquantized in float32.

    quantize_embeddings=True quantizes the nn.Embedding tables too, as
    lowbit.quantize_model(..., quantize_embeddings=True) does, also for a float table of a lowbit
    or bitsandbytes checkpoint. Embeddings a checkpoint stores quantized load quantized whatever
    this says. GPTQ/AWQ/compressed-tensors/HQQ checkpoints refuse it (ValueError).
    """
    if not isinstance(quantize_embeddings, bool):
        raise TypeError(f"quantize_embeddings must be a bool, got {quantize_embeddings!r}")
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json (expected a Transformers model directory)"
        )
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if is_affine_method(getattr(hf_config, "quantization_config", None)):
        if load_in_8bit or load_in_4bit or quantization_config is not None or quantize_embeddings:
            method = quant_method(hf_config.quantization_config)
            raise ValueError(
                f"the checkpoint is already quantized ({method}); load it without "
                "load_in_4bit/load_in_8bit/quantization_config/quantize_embeddings (its "
                "embeddings load as it stores them)"
            )
        return _from_pretrained_affine(
            path,
            hf_config,
            device_map=device_map,
            torch_dtype=torch_dtype,
            max_memory=max_memory,
            offload_folder=offload_folder,
            model_class=model_class,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
    saved = _saved_quant_config(hf_config)
    requested = _requested_config(load_in_8bit, load_in_4bit, quantization_config)
    config = _merge_saved(saved, requested) if saved is not None else requested
    if config is not None and config.bits is None:
        config = None
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # keep Transformers' own quantizers out of from_config
    dtype = _resolve_dtype(torch_dtype, hf_config)
    files = checkpoint_files(path, allow_pickle)

    cls = model_class or _model_class(hf_config)
    model = _build_empty(cls, hf_config, trust_remote_code)
    skip = skip_list(model, config, skip_modules) if config is not None else []
    dmap = resolve_device_map(model, device_map, config, dtype, skip, max_memory)
    device_of = device_lookup(dmap)
    for name, mod in model.named_modules():  # every module holding tensors needs a place
        if next(mod.parameters(recurse=False), None) is not None:
            device_of(name)
    accel = any(is_accelerator(d) for d in dmap.values())
    offloaded = [m for m, d in dmap.items() if d in ("cpu", "disk")] if accel else []
    if offloaded and config is not None:
        if saved is not None:
            raise ValueError("a pre-quantized checkpoint cannot keep offloaded modules in float32")
        if not config.llm_int8_enable_fp32_cpu_offload:
            raise ValueError(
                f"device_map puts {offloaded} on cpu/disk next to accelerator modules; set "
                "llm_int8_enable_fp32_cpu_offload=True to keep those modules unquantized in float32"
            )
        skip = skip + offloaded
    if not accel and "disk" in dmap.values():
        logger.warning(
            "device_map 'disk' entries without an accelerator are loaded into CPU memory"
        )

    if config is not None:
        replace_linear_layers(model, config, skip)
        stored = _stored_quantized_embeddings(model, files) if saved is not None else {}
        wanted = []
        if quantize_embeddings:
            wanted = embeddings_to_quantize(model, config.skip_modules + list(skip_modules or []))
        for name in dict.fromkeys([*stored, *wanted]):
            _swap_in_empty_embedding(model, name, config, stored.get(name), dtype)

    def device_for(name: str) -> str:
        # "disk" modules are read into CPU memory; with an accelerator, dispatch offloads them.
        dev = device_of(name)
        return "cpu" if dev == "disk" else dev

    loader = TensorLoader(model, dtype=dtype, device_for=device_for)
    loader.fp32_modules = set(offloaded)
    _stream(files, loader, progress)
    _finalize(model, device_for)
    if accel and (len(set(dmap.values())) > 1 or offloaded):
        _dispatch(model, dmap, offload_folder)
    model.eval()
    return model


def _stream(files, loader: TensorLoader, progress) -> None:
    """Feed every tensor of the files to the loader, one at a time, then finish it."""
    bar = progress_bar(total=count_tensors(files), desc="Loading", enabled=progress)
    for file in files:
        for key, tensor in iter_tensors(file):
            loader.add(key, tensor)
            del tensor
            bar.update(1)
    bar.close()
    unexpected = loader.finish()
    if unexpected:
        logger.warning("checkpoint keys the model does not use: %s", unexpected[:20])


def _from_pretrained_affine(
    path,
    hf_config,
    *,
    device_map,
    torch_dtype,
    max_memory,
    offload_folder,
    model_class,
    trust_remote_code,
    progress,
):
    """GPTQ / AWQ / compressed-tensors / HQQ checkpoints: scan the keys, swap exactly the layers
    that hold quantized tensors for LinearAffine, stream and convert (lowbit.loading.affine)."""
    reader = reader_for(hf_config.quantization_config)  # validates the config first
    del hf_config.quantization_config  # keep Transformers' own quantizers out of from_config
    dtype = _resolve_dtype(torch_dtype, hf_config)
    files = affine_loading.check_safetensors_only(path, reader.method)
    cls = model_class or _model_class(hf_config)
    model = _build_empty(cls, hf_config, trust_remote_code)
    layers = affine_loading.quantized_layers(model, affine_loading.checkpoint_keys(files), reader)
    if not layers:
        raise ValueError(
            f"{path}: config.json says {reader.method}, but no tensor of the checkpoint is in "
            f"that format (expected keys ending in {', '.join(reader.markers)})"
        )
    affine_loading.replace_with_affine(model, layers)
    dmap = resolve_device_map(model, device_map, None, dtype, [], max_memory)
    device_of = device_lookup(dmap)
    for name, mod in model.named_modules():
        if next(mod.parameters(recurse=False), None) is not None or isinstance(mod, LinearAffine):
            device_of(name)
    accel = any(is_accelerator(d) for d in dmap.values())

    def device_for(name: str) -> str:
        dev = device_of(name)
        return "cpu" if dev == "disk" else dev

    loader = TensorLoader(model, dtype=dtype, device_for=device_for)
    loader.reader = reader
    loader.affine = layers
    _stream(files, loader, progress)
    _finalize(model, device_for)
    if accel and len(set(dmap.values())) > 1:
        _dispatch(model, dmap, offload_folder)
    affine_loading.mark_affine(model, reader)
    model.eval()
    return model


def _build_empty(cls, hf_config, trust_remote_code):
    try:
        from accelerate import init_empty_weights
    except ImportError:
        init_empty_weights = None
    if init_empty_weights is not None:
        # include_buffers=False: non-persistent buffers (rotary inv_freq) are computed for real.
        with init_empty_weights(include_buffers=False):
            return cls.from_config(hf_config, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return cls.from_config(hf_config, trust_remote_code=trust_remote_code)


def _finalize(model: nn.Module, device_for) -> None:
    """Tie weights, then initialise (with a warning) anything the checkpoint did not hold."""
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if not missing:
        return
    for name in missing:
        mod_name = name.rpartition(".")[0]
        module = model.get_submodule(mod_name)
        if isinstance(module, (*QUANTIZED_LINEAR_TYPES, LinearAffine)):
            raise ValueError(
                f"{name}: missing from the checkpoint (a quantized layer needs its weight)"
            )
    logger.warning("weights missing from the checkpoint, newly initialised: %s", missing[:20])
    for mod_name in dict.fromkeys(n.rpartition(".")[0] for n in missing):
        module = model.get_submodule(mod_name)
        module.to_empty(device=device_for(mod_name), recurse=False)
        init = getattr(model, "_init_weights", None)
        if callable(init):
            init(module)
    if callable(tie):
        tie()


def _dispatch(model, device_map, offload_folder):
    from accelerate import dispatch_model

    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError("device_map sends modules to 'disk': pass offload_folder")
    dispatch_model(model, device_map=device_map, offload_dir=offload_folder)


def _stored_quantized_embeddings(model: nn.Module, files) -> dict[str, int]:
    """{name: 4 or 8} of the model's nn.Embedding modules that the checkpoint stores quantized
    (they own a `weight.quant_state.*` or an `SCB` key). Keys are listed from safetensors headers
    only; pickled checkpoints are not scanned (their embeddings load as float)."""
    from safetensors import safe_open

    embeddings = {n for n, m in model.named_modules() if type(m) is nn.Embedding}
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: dict[str, int] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            continue
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if ".weight.quant_state." in key:
                    owner, bits = key.partition(".weight.quant_state.")[0], 4
                elif key.endswith(".SCB"):
                    owner, bits = key[: -len(".SCB")], 8
                else:
                    continue
                for name in (owner, owner.removeprefix(prefix + "."), f"{prefix}.{owner}"):
                    if name in embeddings:
                        found[name] = bits
    return found


def _swap_in_empty_embedding(model, name, config: LowbitConfig, bits, dtype) -> None:
    old = model.get_submodule(name)
    if bits is not None and bits != config.bits:
        config = LowbitConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    new = make_quantized_embedding(
        old.num_embeddings, old.embedding_dim, config, dtype=dtype or old.weight.dtype
    )
    new.padding_idx = old.padding_idx
    new.train(old.training)
    set_submodule(model, name, new)
