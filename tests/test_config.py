"""LowbitConfig: BitsAndBytesConfig's fields and defaults, validation, serialisation."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from lowbit import LowbitConfig
from lowbit.config import FORMAT_VERSION


def test_fields_and_defaults_match_bitsandbytesconfig():
    transformers = pytest.importorskip("transformers")
    ours = inspect.signature(LowbitConfig.__init__).parameters
    theirs = inspect.signature(transformers.BitsAndBytesConfig.__init__).parameters
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name


def test_defaults():
    c = LowbitConfig()
    assert (c.load_in_4bit, c.load_in_8bit, c.bits, c.quant_type) == (False, False, None, None)
    assert c.llm_int8_threshold == 6.0 and c.llm_int8_skip_modules is None
    assert c.llm_int8_enable_fp32_cpu_offload is False and c.llm_int8_has_fp16_weight is False
    assert c.bnb_4bit_compute_dtype is None and c.bnb_4bit_quant_type == "fp4"
    assert c.bnb_4bit_use_double_quant is False and c.bnb_4bit_quant_storage == torch.uint8
    assert c.quant_method == "lowbit"


def test_helper_properties():
    c4 = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    assert (c4.bits, c4.quant_type, c4.load_in_4bit, c4.load_in_8bit) == (4, "nf4", True, False)
    assert c4.quantization_method() == "nf4" and c4.is_quantizable
    c8 = LowbitConfig(load_in_8bit=True, llm_int8_skip_modules=["out"])
    assert (c8.bits, c8.quant_type, c8.quantization_method()) == (8, "int8", "llm_int8")
    assert c8.skip_modules == ["out"]


@pytest.mark.parametrize("value", ["bfloat16", "torch.bfloat16", torch.bfloat16])
def test_compute_dtype_accepts_names_and_dtypes(value):
    assert LowbitConfig(bnb_4bit_compute_dtype=value).bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(load_in_4bit=True, load_in_8bit=True), ValueError, "both"),
        (dict(load_in_4bit=1), TypeError, "load_in_4bit"),
        (dict(bnb_4bit_quant_type="int4"), ValueError, "bnb_4bit_quant_type"),
        (dict(bnb_4bit_compute_dtype="float99"), ValueError, "bnb_4bit_compute_dtype"),
        (dict(bnb_4bit_compute_dtype=torch.int8), ValueError, "bnb_4bit_compute_dtype"),
        (dict(bnb_4bit_compute_dtype=3), TypeError, "bnb_4bit_compute_dtype"),
        (dict(bnb_4bit_quant_storage="complex64"), ValueError, "bnb_4bit_quant_storage"),
        (dict(llm_int8_threshold=-1.0), ValueError, "llm_int8_threshold"),
        (dict(llm_int8_threshold=float("nan")), ValueError, "llm_int8_threshold"),
        (dict(llm_int8_threshold=float("inf")), ValueError, "llm_int8_threshold"),
        (dict(llm_int8_threshold="6"), TypeError, "llm_int8_threshold"),
        (dict(llm_int8_skip_modules="lm_head"), TypeError, "llm_int8_skip_modules"),
        (dict(llm_int8_skip_modules=["ok", 3]), TypeError, "llm_int8_skip_modules"),
        (dict(bnb_4bit_use_double_quant="yes"), TypeError, "bnb_4bit_use_double_quant"),
        (dict(load_in_3bit=True), TypeError, "load_in_3bit"),
    ],
)
def test_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LowbitConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        dict(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=torch.float16,
            bnb_4bit_quant_storage="bfloat16",
        ),
        dict(load_in_8bit=True, llm_int8_threshold=3.5, llm_int8_skip_modules=["a", "b.c"]),
        dict(
            load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True, llm_int8_has_fp16_weight=True
        ),
        dict(),
    ],
)
def test_round_trips(kwargs, tmp_path):
    c = LowbitConfig(**kwargs)
    assert LowbitConfig.from_dict(c.to_dict()) == c
    assert LowbitConfig.from_json_string(c.to_json_string()) == c
    c.to_json_file(tmp_path / "q.json")
    assert LowbitConfig.from_json_file(tmp_path / "q.json") == c
    for k, v in kwargs.items():
        assert getattr(LowbitConfig.from_dict(c.to_dict()), k) == (
            v if not isinstance(v, str) or k != "bnb_4bit_quant_storage" else torch.bfloat16
        )


def test_serialised_form_has_no_load_in_keys():
    for c in (LowbitConfig(load_in_4bit=True), LowbitConfig(load_in_8bit=True)):
        for d in (c.to_dict(), json.loads(c.to_json_string()), dict(c), c.to_diff_dict()):
            assert not any(k.startswith(("load_in", "_load_in")) for k in d), d
            assert d["quant_method"] == "lowbit" and d["format_version"] == FORMAT_VERSION
    assert LowbitConfig(load_in_4bit=True).to_dict()["bits"] == 4
    assert LowbitConfig(load_in_8bit=True).to_dict()["bits"] == 8


def test_reads_bitsandbytes_form():
    transformers = pytest.importorskip("transformers")
    bnb = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    c = LowbitConfig.from_dict(json.loads(bnb.to_json_string()))
    assert (c.bits, c.quant_type, c.bnb_4bit_compute_dtype) == (4, "nf4", torch.bfloat16)
    c8 = LowbitConfig.from_dict(transformers.BitsAndBytesConfig(load_in_8bit=True).to_dict())
    assert c8.bits == 8
    assert LowbitConfig.from_dict({"load_in_8bit": True}).bits == 8


def test_from_dict_errors():
    with pytest.raises(ValueError, match=r"format_version 99.*reads format_version 1"):
        LowbitConfig.from_dict({"quant_method": "lowbit", "format_version": 99, "bits": 4})
    with pytest.raises(ValueError, match="quant_method"):
        LowbitConfig.from_dict({"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="bits"):
        LowbitConfig.from_dict({"bits": 3})
    with pytest.raises(ValueError, match="mystery"):
        LowbitConfig.from_dict({"bits": 4, "mystery": 1})
    with pytest.raises(ValueError, match="JSON"):
        LowbitConfig.from_json_string("{bad")
    with pytest.raises(TypeError):
        LowbitConfig.from_dict([("bits", 4)])


def test_from_dict_kwargs_follow_transformers_convention():
    c, unused = LowbitConfig.from_dict(
        {"bits": 8}, return_unused_kwargs=True, llm_int8_threshold=2.0, other=1
    )
    assert c.llm_int8_threshold == 2.0 and unused == {"other": 1}
    with pytest.raises(TypeError, match="other"):
        LowbitConfig.from_dict({"bits": 8}, other=1)


def test_has_the_interface_transformers_uses_without_importing_it():
    # Not a QuantizationConfigMixin subclass on purpose (importing Transformers would double the
    # time of `import lowbit`); tests/test_transformers.py shows the plug-in works with it.
    qc = pytest.importorskip("transformers.utils.quantization_config")
    for name in (
        "to_dict",
        "to_diff_dict",
        "to_json_string",
        "to_json_file",
        "from_dict",
        "post_init",
        "get_loading_attributes",
    ):
        assert callable(getattr(LowbitConfig, name)), name
        assert hasattr(qc.QuantizationConfigMixin, name) or name in (
            "post_init",
            "get_loading_attributes",
        )
    assert LowbitConfig(load_in_4bit=True).quant_method == "lowbit"
