"""save_pretrained(format="bitsandbytes"): checkpoints that Transformers + bitsandbytes load in a
process where `import lowbit` is blocked, with lowbit's codes bit for bit and the same logits.

Each check that needs bitsandbytes runs it in a subprocess (one per test, several checkpoints per
subprocess), so this process never mixes bitsandbytes' layers with lowbit's.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import _helpers_nn

pytest.importorskip("transformers", reason="the export test needs transformers")

import lowbit  # noqa: E402
from lowbit import nn as lnn  # noqa: E402

try:
    import bitsandbytes  # noqa: F401

    HAVE_BNB = True
except ImportError:  # pragma: no cover - CI installs it
    HAVE_BNB = False
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed")

CONFIGS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4-double": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": True,
    },
    "int8": {"load_in_8bit": True},
}
EXTRA_SKIP = ["model.layers.1.mlp.down_proj"]  # a float linear layer besides lm_head

# Runs in a fresh interpreter: blocks lowbit, then loads / saves with Transformers + bitsandbytes.
_BNB_SCRIPT = textwrap.dedent(
    r"""
    import importlib.abc, json, sys

    class _NoLowbit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lowbit" or name.startswith("lowbit."):
                raise ImportError("import lowbit is blocked in this process")

    sys.meta_path.insert(0, _NoLowbit())

    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    jobs = json.loads(sys.argv[1])
    for job in jobs:
        if job["kind"] == "save":  # bitsandbytes' own checkpoint of a float model
            config = BitsAndBytesConfig(**job["config"])
            model = AutoModelForCausalLM.from_pretrained(
                job["src"], quantization_config=config, device_map="cpu"
            )
            model.save_pretrained(job["dst"])
            continue
        model, info = AutoModelForCausalLM.from_pretrained(
            job["src"], device_map="cpu", output_loading_info=True
        )
        result = {"info": {k: [str(x) for x in v] for k, v in info.items()}, "layers": {}}
        for name, m in model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                qs = m.weight.quant_state
                result["layers"][name] = {
                    "kind": "4bit",
                    "packed": m.weight.data.clone(),
                    "weight": bnb_F.dequantize_4bit(m.weight.data, qs),
                }
            elif isinstance(m, bnb.nn.Linear8bitLt):
                result["layers"][name] = {
                    "kind": "8bit", "CB": m.weight.data.clone(), "SCB": m.weight.SCB.clone()
                }
            elif type(m) is torch.nn.Linear:
                result["layers"][name] = {"kind": "float"}
        ids = torch.load(job["ids"])
        with torch.no_grad():
            result["logits"] = model(ids).logits
            # bitsandbytes' CPU 4-bit inference on AVX512-BF16 machines repacks the weight with
            # bf16 scales on the first forward; its exact path decodes the fp32 scales.
            for m in model.modules():
                if isinstance(m, bnb.nn.Linear4bit):
                    m.support_avx512bf16_for_cpu = False
            fresh = AutoModelForCausalLM.from_pretrained(job["src"], device_map="cpu")
            for m in fresh.modules():
                if isinstance(m, bnb.nn.Linear4bit):
                    m.support_avx512bf16_for_cpu = False
            result["logits_exact"] = fresh(ids).logits
        assert "lowbit" not in sys.modules
        torch.save(result, job["out"])
    """
)


def _run_bnb(tmp_path, jobs):
    script = tmp_path / "bnb_side.py"
    script.write_text(_BNB_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-float")
    _helpers_nn.tiny_llama(tie=False, vocab_size=256).save_pretrained(path)
    torch.save(_helpers_nn.tokens(256, shape=(2, 12)), path / "ids.pt")
    return path


def _quantized(float_dir, name):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_dir)
    return lowbit.quantize_model(model, lowbit.LowbitConfig(**CONFIGS[name]), EXTRA_SKIP)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _dequantized_float_model(model):
    """A float copy of `model` whose linear weights are lowbit's decoded weights."""
    import copy

    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, lnn.Linear4bit):
            new = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            new.weight.data = m.dequantize(torch.float32)
            if m.bias is not None:
                new.bias.data = m.bias.data.float()
            model.set_submodule(name, new)
    return model


@needs_bnb
def test_bitsandbytes_loads_lowbit_exports(float_dir, tmp_path):
    ids = torch.load(float_dir / "ids.pt")
    models, jobs = {}, []
    for name in CONFIGS:
        model = _quantized(float_dir, name)
        dst = tmp_path / name
        lowbit.save_pretrained(model, dst, format="bitsandbytes")
        (dst / "ids.pt").write_bytes((float_dir / "ids.pt").read_bytes())
        models[name] = model
        jobs.append(
            {"kind": "load", "src": str(dst), "ids": str(dst / "ids.pt"), "out": str(dst / "r.pt")}
        )
    # GPT-2: Conv1D layers (transposed [in, out] float weights) quantized by lowbit
    gpt2 = lowbit.quantize_model(_helpers_nn.tiny_gpt2(), lowbit.LowbitConfig(**CONFIGS["nf4"]))
    dst = tmp_path / "gpt2"
    lowbit.save_pretrained(gpt2, dst, format="bitsandbytes")
    torch.save(_helpers_nn.tokens(128, shape=(2, 12)), dst / "ids.pt")
    jobs.append(
        {"kind": "load", "src": str(dst), "ids": str(dst / "ids.pt"), "out": str(dst / "r.pt")}
    )
    _run_bnb(tmp_path, jobs)

    r = torch.load(dst / "r.pt")
    assert not any(r["info"].values()), r["info"]
    for n, m in gpt2.named_modules():
        if isinstance(m, lnn.Linear4bit):
            assert torch.equal(r["layers"][n]["weight"], m.dequantize(torch.float32)), n
    assert _cosine(r["logits_exact"], _logits(gpt2, torch.load(dst / "ids.pt"))) > 0.9995

    for name, model in models.items():
        r = torch.load(tmp_path / name / "r.pt")
        assert not any(r["info"].values()), r["info"]  # no missing / unexpected / mismatched keys
        ours = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, (lnn.Linear4bit, lnn.Linear8bitLt))
        }
        theirs = {n: v for n, v in r["layers"].items() if v["kind"] != "float"}
        assert sorted(theirs) == sorted(ours)  # the same layers quantized, the same left float
        assert {n for n, v in r["layers"].items() if v["kind"] == "float"} == {
            "lm_head",
            *EXTRA_SKIP,
        }
        for n, m in ours.items():
            if isinstance(m, lnn.Linear4bit):
                assert torch.equal(r["layers"][n]["packed"], m.weight.data), n
                assert torch.equal(r["layers"][n]["weight"], m.dequantize(torch.float32)), n
            else:
                assert torch.equal(r["layers"][n]["CB"], m.weight.data), n
                assert torch.equal(r["layers"][n]["SCB"], m.weight.SCB), n
        lowbit_logits = _logits(model, ids)
        if name != "int8":
            # bitsandbytes' exact 4-bit path vs a float model holding lowbit's decoded weights
            ref = _logits(_dequantized_float_model(model), ids)
            torch.testing.assert_close(r["logits_exact"], ref, rtol=1e-4, atol=1e-4)
        # the same logits within the int8 / 4-bit product bars: lowbit's CPU 4-bit product rounds
        # activations to int8, bitsandbytes' LLM.int8() rounds them through fp16
        assert _cosine(r["logits"], lowbit_logits) > 0.9995
        assert _cosine(r["logits_exact"], lowbit_logits) > 0.9995


@needs_bnb
@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_has_bitsandbytes_own_keys_and_config(float_dir, tmp_path, name):
    from safetensors import safe_open

    bnb_config = {k: v for k, v in CONFIGS[name].items()}
    _run_bnb(
        tmp_path,
        [
            {
                "kind": "save",
                "src": str(float_dir),
                "dst": str(tmp_path / "bnb"),
                "config": bnb_config,
            }
        ],
    )
    from transformers import AutoModelForCausalLM

    model = lowbit.quantize_model(
        AutoModelForCausalLM.from_pretrained(float_dir), lowbit.LowbitConfig(**CONFIGS[name])
    )
    lowbit.save_pretrained(model, tmp_path / "ours", format="bitsandbytes")

    def tensors(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    ours, theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "bnb")
    assert sorted(ours) == sorted(theirs)
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype and ours[k].shape == t.shape, k
        if ".quant_state." in k:
            assert json.loads(bytes(ours[k].tolist())) == json.loads(bytes(t.tolist())), k
        elif k.endswith(".weight") and name == "nf4":
            assert torch.equal(ours[k], t), k  # NF4 codes are byte-identical with bitsandbytes'
    ours_qc = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    theirs_qc = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]
    assert sorted(ours_qc) == sorted(theirs_qc)
    # bitsandbytes leaves the skip list to Transformers' defaults; lowbit names the float layers
    assert theirs_qc.pop("llm_int8_skip_modules") is None
    assert ours_qc.pop("llm_int8_skip_modules") == ["lm_head"]
    assert ours_qc == theirs_qc


@needs_bnb
def test_model_save_pretrained_format_argument(float_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    # a model loaded through Transformers with lowbit's quantizer, and one quantized in place
    hf = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=lowbit.LowbitConfig(load_in_4bit=True), device_map="cpu"
    )
    hf.save_pretrained(tmp_path / "hf-bnb", format="bitsandbytes")
    hf.save_pretrained(tmp_path / "hf-lowbit")  # the default stays lowbit's own format
    ours = _quantized(float_dir, "int8")
    ours.save_pretrained(tmp_path / "q-bnb", format="bitsandbytes", max_shard_size="40KB")
    ours.save_pretrained(tmp_path / "q-lowbit")
    method = {
        d: json.loads((tmp_path / d / "config.json").read_text())["quantization_config"][
            "quant_method"
        ]
        for d in ("hf-bnb", "hf-lowbit", "q-bnb", "q-lowbit")
    }
    assert method == {
        "hf-bnb": "bitsandbytes",
        "hf-lowbit": "lowbit",
        "q-bnb": "bitsandbytes",
        "q-lowbit": "lowbit",
    }
    assert (tmp_path / "q-bnb" / "model.safetensors.index.json").is_file()  # sharded
    ids = torch.load(float_dir / "ids.pt")
    jobs = []
    for d in ("hf-bnb", "q-bnb"):
        jobs.append(
            {
                "kind": "load",
                "src": str(tmp_path / d),
                "ids": str(float_dir / "ids.pt"),
                "out": str(tmp_path / d / "r.pt"),
            }
        )
    _run_bnb(tmp_path, jobs)
    for d, model in (("hf-bnb", hf), ("q-bnb", ours)):
        r = torch.load(tmp_path / d / "r.pt")
        assert not any(r["info"].values()), r["info"]
        assert _cosine(r["logits"], _logits(model, ids)) > 0.9995
    # lowbit reads both formats back to the same codes
    for d in ("q-bnb", "q-lowbit"):
        back = lowbit.from_pretrained(tmp_path / d)
        assert torch.equal(_logits(back, ids), _logits(ours, ids))
    # a temporary model saves too (the format argument lives on the class, not the instance)
    lowbit.from_pretrained(tmp_path / "q-lowbit").save_pretrained(
        tmp_path / "t", format="bitsandbytes"
    )
    assert (tmp_path / "t" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="format must be one of"):
        ours.save_pretrained(tmp_path / "x", format="gguf")
    with pytest.raises(TypeError, match="extra arguments"):
        ours.save_pretrained(tmp_path / "x", format="bitsandbytes", push_to_hub=True)


def test_export_refuses_what_bitsandbytes_cannot_load(float_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_dir)
    with pytest.raises(ValueError, match="no lowbit quantized linear layers"):
        lowbit.save_pretrained(model, tmp_path / "a", format="bitsandbytes")
    with pytest.raises(ValueError, match="format must be one of"):
        lowbit.save_pretrained(model, tmp_path / "a", format="bnb")
    emb = lowbit.quantize_model(
        AutoModelForCausalLM.from_pretrained(float_dir),
        lowbit.LowbitConfig(load_in_4bit=True),
        quantize_embeddings=True,
    )
    with pytest.raises(ValueError, match="cannot read the quantized embeddings"):
        lowbit.save_pretrained(emb, tmp_path / "b", format="bitsandbytes")
    mixed = _quantized(float_dir, "nf4")
    lin = mixed.lm_head
    mixed.lm_head = lnn.Linear8bitLt.from_linear(lin)
    with pytest.raises(ValueError, match="mixes 4-bit and 8-bit"):
        lowbit.save_pretrained(mixed, tmp_path / "c", format="bitsandbytes")
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_skip_entries_never_match_a_quantized_layer():
    from lowbit.loading.save import _bnb_skip_entry

    # Transformers matches skip entries as regexes at the start of a name, or as a suffix: an
    # entry that would also hit a quantized layer is written as an anchored literal.
    assert _bnb_skip_entry("lm_head", ["model.layers.0.q_proj"]) == "lm_head"
    assert _bnb_skip_entry("mlp.fc", ["mlp.fc1"]) == "mlp\\.fc$"
    assert _bnb_skip_entry("proj", ["model.q_proj"]) == "proj$"
