"""`lowbit inspect DIR`: what a checkpoint holds, layer by layer.

It reads the safetensors files directly (no model class, no Transformers), recognises the
bitsandbytes key layout lowbit writes (4-bit: `weight` + `weight.absmax`/`quant_map`/
`quant_state.bitsandbytes__*`; 8-bit: int8 `weight` + `SCB`), and decodes each quantized weight
with lowbit.functional. Tensors are loaded one layer at a time, so large checkpoints fit.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from lowbit.cli import _model
from lowbit.cli.errors import CliError

_4BIT_AUX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_QS = "quant_state.bitsandbytes__"


class Checkpoint:
    """Key -> file index over every *.safetensors file of a directory, read lazily."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.files = sorted(path.glob("*.safetensors"))
        self._handles = {}
        self.where: dict[str, Path] = {}
        for f in self.files:
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CliError(f"cannot read {f}: {e}") from None
            self._handles[f] = handle
            for key in handle.keys():
                self.where[key] = f

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str):
        return self._handles[self.where[key]].get_tensor(key)

    def nbytes(self, key: str) -> int:
        t = self._handles[self.where[key]].get_slice(key)
        dtype_bytes = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1}
        dtype_bytes |= {"I16": 2, "U16": 2, "F16": 2, "BF16": 2}
        dtype_bytes |= {"I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
        return math.prod(t.get_shape()) * dtype_bytes.get(t.get_dtype(), 4)

    def find(self, key: str) -> str | None:
        """`key`, or the one key that ends with it or that it ends with (a model saved with or
        without its base-model prefix, e.g. `model.` or `bert.`)."""
        if key in self.where:
            return key
        matches = [k for k in self.where if k.endswith("." + key) or key.endswith("." + k)]
        return matches[0] if len(matches) == 1 else None


def _layers(ckpt: Checkpoint) -> dict[str, dict[str, str]]:
    """module prefix -> {role: key}; roles: weight, 4-bit aux names, quant_state, SCB."""
    layers: dict[str, dict[str, str]] = {}
    for key in ckpt.where:
        if key.endswith(".weight"):
            layers.setdefault(key[: -len(".weight")], {})["weight"] = key
        elif ".weight." in key:
            module, _, rest = key.rpartition(".weight.")
            role = "quant_state" if rest.startswith(_QS) else rest
            layers.setdefault(module, {})[role] = key
        elif key.endswith((".SCB", ".weight_format")):
            module, _, role = key.rpartition(".")
            layers.setdefault(module, {})[role] = key
    return {m: roles for m, roles in sorted(layers.items()) if "weight" in roles}


def _describe(ckpt: Checkpoint, module: str, roles: dict[str, str]) -> dict | None:
    """One layer's format, logical shape, stored bytes and decoded weight (None: not a layer)."""
    from lowbit import functional as F

    weight = ckpt.get(roles["weight"])
    stored = sum(ckpt.nbytes(k) for k in roles.values())
    if "quant_state" in roles:
        qs_key = roles["quant_state"]
        stats = {"weight." + r: ckpt.get(k) for r, k in roles.items() if r in _4BIT_AUX}
        stats["weight." + qs_key.rpartition(".weight.")[2]] = ckpt.get(qs_key)
        try:
            qs = F.QuantState.from_dict(stats, device="cpu")
        except ValueError as e:
            raise CliError(f"{module}: invalid 4-bit quant state: {e}") from None
        decoded = F.dequantize_4bit(weight, qs).float()
        scales = F.decode_absmax(qs).float()
        return _row(module, qs.quant_type, list(qs.shape), stored, decoded, scales, qs.nested)
    if "SCB" in roles:
        scb = ckpt.get(roles["SCB"]).float()
        decoded = F.int8_vectorwise_dequant(weight, scb).float()
        return _row(module, "int8", list(weight.shape), stored, decoded, scb, False)
    if weight.is_floating_point() and weight.dim() >= 2:
        stored = ckpt.nbytes(roles["weight"])
        return _row(module, "float", list(weight.shape), stored, weight.float(), None, False)
    return None


def _row(module, fmt, shape, stored, decoded, scales, nested):
    row = {
        "layer": module,
        "format": fmt,
        "shape": shape,
        "bytes": stored,
        "bits_per_weight": stored * 8 / max(1, math.prod(shape)),
        "double_quant": nested,
        "_decoded": decoded,
    }
    if scales is not None:
        row["scale_min"] = scales.min().item()
        row["scale_mean"] = scales.mean().item()
        row["scale_max"] = scales.max().item()
    return row


def _compare(row: dict, ref: Checkpoint) -> None:
    decoded = row["_decoded"]
    key = ref.find(row["layer"] + ".weight")
    if key is None:
        row["reference"] = None
        return
    original = ref.get(key).float()
    if original.shape != decoded.shape and original.t().shape == decoded.shape:
        original = original.t()  # Conv1D checkpoints store [in, out]; lowbit stores [out, in]
    if original.shape != decoded.shape:
        raise CliError(
            f"{row['layer']}: shape {list(decoded.shape)} does not match the reference's "
            f"{list(original.shape)} ({key})"
        )
    err = decoded - original
    norm = original.norm().item()
    row["reference"] = key
    row["rel_error"] = err.norm().item() / norm if norm > 0 else float(err.norm().item() > 0)
    row["max_abs_error"] = err.abs().max().item()
    row["sqnr_db"] = -20 * math.log10(row["rel_error"]) if row["rel_error"] > 0 else math.inf


def _affine_rows(ckpt: Checkpoint, qconfig) -> tuple[list[dict], set[str]]:
    """Rows for the layers of a GPTQ / AWQ / compressed-tensors / HQQ checkpoint, each converted
    by lowbit's reader (as from_pretrained does) and decoded; and the prefixes they cover."""
    import torch

    from lowbit import functional as F
    from lowbit.formats import FormatError, reader_for

    try:
        reader = reader_for(qconfig)
    except FormatError as e:
        raise CliError(str(e)) from None
    by_prefix: dict[str, dict[str, str]] = {}
    for key in ckpt.where:
        prefix, _, local = key.rpartition(".")
        by_prefix.setdefault(prefix, {})[local] = key
    rows = []
    for prefix, roles in sorted(by_prefix.items()):
        if not reader.is_quantized(set(roles)):
            continue
        keys = {local: k for local, k in roles.items() if reader.accepts(local)}
        stash = {local: ckpt.get(k) for local, k in keys.items()}
        try:
            N, K = reader.infer_shape(stash)
            missing = reader.missing(prefix, stash)
            if missing:
                raise FormatError(f"{prefix}: missing " + ", ".join(missing))
            w = reader.convert(prefix, stash, K, N)
        except (FormatError, KeyError, ValueError) as e:
            raise CliError(f"{prefix}: invalid {reader.method} layer: {e}") from None
        decoded = F.dequantize_affine(
            w.packed, w.scales, w.zeros, w.bits, w.group_size, [N, K], torch.float32
        )
        if w.perm is not None:
            stored, decoded = decoded, torch.empty_like(decoded)
            decoded[:, w.perm] = stored  # back to the original input order
        stored_bytes = sum(ckpt.nbytes(k) for local, k in keys.items() if local != "bias")
        label = f"{reader.method}-int{w.source_bits}" + ("+perm" if w.perm is not None else "")
        rows.append(_row(prefix, label, [N, K], stored_bytes, decoded, w.scales, False))
    return rows, {r["layer"] for r in rows}


def inspect_checkpoint(path: Path, reference: Path | None = None) -> dict:
    from lowbit.formats import is_affine_method

    ckpt = Checkpoint(path)
    ref = Checkpoint(reference) if reference is not None else None
    qconfig = _read_qconfig(path)
    rows, covered = [], set()
    if is_affine_method(qconfig):
        rows, covered = _affine_rows(ckpt, qconfig)
        if ref is not None:
            for row in rows:
                _compare(row, ref)
        for row in rows:
            del row["_decoded"]
    for module, roles in _layers(ckpt).items():
        if module in covered:
            continue
        row = _describe(ckpt, module, roles)
        if row is None:
            continue
        if ref is not None:
            _compare(row, ref)
        del row["_decoded"]
        rows.append(row)

    totals: dict[str, dict] = {}
    for row in rows:
        t = totals.setdefault(row["format"], {"layers": 0, "params": 0, "bytes": 0})
        t["layers"] += 1
        t["params"] += math.prod(row["shape"])
        t["bytes"] += row["bytes"]
    file_bytes = sum(f.stat().st_size for f in ckpt.files)
    quantized = [r for r in rows if r["format"] != "float" and r.get("rel_error") is not None]
    summary = {"formats": totals, "file_bytes": file_bytes}
    if quantized:
        params = sum(math.prod(r["shape"]) for r in quantized)
        summary["weighted_rel_error"] = (
            sum(r["rel_error"] * math.prod(r["shape"]) for r in quantized) / params
        )
        summary["max_rel_error"] = max(r["rel_error"] for r in quantized)
    return {
        "dir": str(path),
        "reference": str(reference) if reference else None,
        "quantization_config": qconfig,
        "layers": rows,
        "totals": summary,
    }


def _read_qconfig(path: Path):
    config_path = path / "config.json"
    if not config_path.is_file():
        return None
    try:
        return json.loads(config_path.read_text()).get("quantization_config")
    except (json.JSONDecodeError, AttributeError):
        return None


def _print(result: dict) -> None:
    with_ref = result["reference"] is not None
    print(f"checkpoint: {result['dir']}")
    if result["quantization_config"]:
        q = result["quantization_config"]
        from lowbit.formats import FormatError, is_affine_method, reader_for

        if is_affine_method(q):
            try:
                print(f"quantization_config: {reader_for(q).summary()}")
            except FormatError as e:
                print(f"quantization_config: {q.get('quant_method')} (unsupported: {e})")
        else:
            keys = ("quant_method", "bits")
            keys += ("bnb_4bit_quant_type",) if q.get("bits") == 4 else ()
            brief = {k: q[k] for k in keys if k in q}
            print(f"quantization_config: {json.dumps(brief)}")
    if with_ref:
        print(f"reference: {result['reference']}")
        head = ("layer", "format", "shape", "bytes", "bits/w", "rel err", "max abs err", "SQNR dB")
    else:
        head = ("layer", "format", "shape", "bytes", "bits/w", "scale min", "mean", "max")
    rows = []
    for r in result["layers"]:
        fmt = r["format"] + ("+dq" if r["double_quant"] else "")
        cells = [r["layer"], fmt, "x".join(map(str, r["shape"])), str(r["bytes"])]
        cells.append(f"{r['bits_per_weight']:.2f}")
        if with_ref:
            if r.get("reference") is None:
                cells += ["-", "-", "-"]
            else:
                cells += [f"{r['rel_error']:.2e}", f"{r['max_abs_error']:.2e}"]
                cells.append(f"{r['sqnr_db']:.1f}")
        elif "scale_min" in r:
            cells += [f"{r['scale_min']:.3g}", f"{r['scale_mean']:.3g}", f"{r['scale_max']:.3g}"]
        else:
            cells += ["-", "-", "-"]
        rows.append(cells)
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print(
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    totals = result["totals"]
    print()
    fw = max([6, *map(len, totals["formats"])])
    for fmt, t in sorted(totals["formats"].items()):
        mb = t["bytes"] / 2**20
        print(f"{fmt:<{fw}} {t['layers']:>4} layers  {t['params']:>12,} weights  {mb:10.2f} MB")
    print(f"{'files':<{fw}} {totals['file_bytes'] / 2**20:.2f} MB on disk")
    if "weighted_rel_error" in totals:
        print(
            f"quantization error vs reference: {totals['weighted_rel_error']:.3e} relative "
            f"(weighted by size), worst layer {totals['max_rel_error']:.3e}"
        )


def run(args) -> int:
    path = _model.checkpoint_dir(args.dir)
    reference = _model.checkpoint_dir(args.reference, "--reference") if args.reference else None
    result = inspect_checkpoint(path, reference)
    if not result["layers"]:
        raise CliError(f"no weight matrices found in {path}")
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        _print(result)
    return 0
