"""lowbit.nn: quantized layers against their float originals, bitsandbytes, and torch's module
machinery (state_dict, deepcopy, pickling, .to, autograd, PEFT)."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
import lowbit.functional as LF
import lowbit.reference
from _helpers_nn import empty_like_layer, float_linear, quantized_linear
from lowbit.nn import Int8Params, Linear4bit, Linear8bitLt, LinearFP4, LinearNF4, Params4bit

KINDS = ["nf4", "fp4", "nf4-dq", "int8"]


def _dequant(layer) -> torch.Tensor:
    return layer.dequantize(torch.float32)


class _Recorder:
    """Stands in for torch.ops.lowbit inside lowbit.nn.modules and records which ops run."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattr__(self, name):
        op = getattr(torch.ops.lowbit, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            return op(*args, **kwargs)

        return call


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(lowbit.nn.modules, "_ops", rec)
    return rec


# ---- API shape ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours, name",
    [
        (Linear4bit, "Linear4bit"),
        (LinearNF4, "LinearNF4"),
        (LinearFP4, "LinearFP4"),
        (Linear8bitLt, "Linear8bitLt"),
    ],
)
def test_constructor_matches_bitsandbytes(ours, name):
    bnb = pytest.importorskip("bitsandbytes")
    theirs = getattr(bnb.nn, name)
    a = [(p.name, p.default) for p in inspect.signature(ours.__init__).parameters.values()]
    b = [(p.name, p.default) for p in inspect.signature(theirs.__init__).parameters.values()]
    assert a == b


def test_subclasses_fix_quant_type():
    assert LinearNF4(8, 4).weight.quant_type == "nf4"
    assert LinearFP4(8, 4).weight.quant_type == "fp4"
    assert Linear4bit(8, 4).weight.quant_type == "fp4"  # bitsandbytes' default


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit(8, 4, quant_type="int4")
    with pytest.raises(TypeError, match="compute_dtype"):
        Linear4bit(8, 4, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="threshold"):
        Linear8bitLt(8, 4, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        Linear8bitLt(8, 4, threshold=float("nan"))


# ---- when quantization happens ----------------------------------------------------------------


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(LF, name)

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(LF, name, counting)
    return calls


def _move(m, how):
    return {"to": m.to, "cpu": m.cpu, "explicit": m.quantize_}[how](
        *(["cpu"] if how == "to" else [])
    )


@pytest.mark.parametrize("move", ["to", "cpu", "explicit"])
def test_4bit_quantizes_once(monkeypatch, move):
    calls = _count_calls(monkeypatch, "quantize_4bit")
    m = Linear4bit(64, 32, quant_type="nf4")
    assert m.weight.dtype == torch.float32 and not m.is_quantized
    for _ in range(3):
        m = _move(m, move)
    assert m.is_quantized and m.weight.dtype == torch.uint8
    assert len(calls) == 1
    m(torch.randn(2, 64))  # forward never re-quantizes either
    assert len(calls) == 1


@pytest.mark.parametrize("move", ["to", "cpu", "explicit"])
def test_8bit_quantizes_once(monkeypatch, move):
    calls = _count_calls(monkeypatch, "int8_vectorwise_quant")
    m = Linear8bitLt(64, 32, has_fp16_weights=False)
    assert m.weight.dtype == torch.float32 and not m.is_quantized
    for _ in range(3):
        m = _move(m, move)
    assert m.is_quantized and m.weight.dtype == torch.int8 and m.weight.SCB.dtype == torch.float32
    assert len(calls) == 1


def test_from_linear_quantizes_and_keeps_bias():
    lin = float_linear()
    for m in (Linear4bit.from_linear(lin, quant_type="nf4"), Linear8bitLt.from_linear(lin)):
        assert m.is_quantized
        assert torch.equal(m.bias, lin.bias)
        assert m.weight.requires_grad is False


def test_first_forward_quantizes_a_float_layer():
    m = Linear4bit(64, 32, quant_type="nf4")
    m(torch.randn(3, 64))
    assert m.is_quantized


def test_meta_weight_cannot_be_quantized():
    with pytest.raises(RuntimeError, match="meta"):
        Linear4bit(8, 4, device="meta").to("cpu")
    with pytest.raises(RuntimeError, match="meta"):
        Linear8bitLt(8, 4, has_fp16_weights=False, device="meta").quantize_()


def test_has_fp16_weights_layer_stays_float_and_trains():
    m = Linear8bitLt(64, 32, has_fp16_weights=True).to("cpu")
    assert m.weight.dtype == torch.float32 and m.weight.requires_grad and not m.is_quantized
    x = torch.randn(4, 64, requires_grad=True)
    m(x).sum().backward()
    assert m.weight.grad is not None and m.weight.grad.shape == (32, 64)
    expected_grad_w = torch.ones(4, 32).t() @ x.detach()
    torch.testing.assert_close(m.weight.grad, expected_grad_w)
    torch.testing.assert_close(x.grad, torch.ones(4, 32) @ m.weight.detach())


# ---- forward ----------------------------------------------------------------------------------


def test_4bit_single_row_uses_gemv(recorder):
    m = quantized_linear("nf4-dq")
    x = torch.randn(1, 1, 64)
    out = m(x)
    assert "gemv_4bit" in recorder.calls and "dequantize_4bit" not in recorder.calls
    qs = m.weight.quant_state
    absmax = LF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    expected = torch.ops.lowbit.gemv_4bit(x, m.weight.data, [32, 64], absmax, qs.code, 64) + m.bias
    assert torch.equal(out, expected)


def test_4bit_many_rows_on_cpu_go_through_the_op(recorder):
    # On the CPU gemv_4bit picks the kernel by M (int8 activations, fused fp32 or BLAS on
    # dequantized tiles); the layer never builds the whole float weight itself.
    m = quantized_linear("fp4")
    for rows in (5, 17):  # 10 and 34 rows: the int8-activation kernel and BLAS
        recorder.calls.clear()
        x = torch.randn(2, rows, 64)
        out = m(x)
        assert recorder.calls == ["gemv_4bit"]
        qs = m.weight.quant_state
        expected = torch.ops.lowbit.gemv_4bit(x, m.weight.data, [32, 64], qs.absmax, qs.code, 64)
        assert torch.equal(out, expected + m.bias)
        torch.testing.assert_close(out, F.linear(x, _dequant(m), m.bias), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 6])
def test_forward_matches_reference_and_float(kind, rows):
    lin = float_linear()
    m = quantized_linear(kind)
    x = torch.randn(rows, 64)
    if kind == "int8":  # activations are quantized too: compare with the op's executable spec
        ref = lowbit.reference.int8_linear(x, m.weight.data, m.weight.SCB, m.bias, m.threshold)
    else:  # the op's executable spec: int8 activations where the CPU kernel uses them
        qs = m.weight.quant_state
        absmax = lowbit.functional.decode_absmax(qs)
        shape = list(qs.shape)
        ref = lowbit.reference.gemv_4bit_expected(x, m.weight.data, shape, absmax, qs.code, 64)
        ref = ref + m.bias
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-4)
    # against the float layer: 4-bit is coarse, 8-bit close
    err = (m(x) - lin(x)).abs().max().item()
    assert err < (0.03 if kind == "int8" else 0.3)
    # per element at most half the widest gap between codes (FP4: (1 - 2/3) / 2) times absmax
    werr = (_dequant(m) - lin.weight).abs().max()
    assert werr <= (0.5 / 127 if kind == "int8" else 1 / 6) * lin.weight.abs().max() * 1.001


def test_8bit_runs_the_fused_op_with_the_threshold(recorder):
    m = quantized_linear("int8", threshold=2.5)
    x = torch.randn(3, 64) * 2
    out = m(x)
    assert recorder.calls == ["int8_linear"]
    expected = torch.ops.lowbit.int8_linear(x, m.weight.data, m.weight.SCB, m.bias, 2.5)
    assert torch.equal(out, expected)


def test_compute_dtype_is_honoured_and_output_keeps_input_dtype():
    m = quantized_linear("nf4", compute_dtype=torch.bfloat16)
    x = torch.randn(4, 64)
    out = m(x)
    assert out.dtype == torch.float32
    qs = m.weight.quant_state
    xb = x.bfloat16()  # the op sees bf16 activations and returns bf16
    expected = torch.ops.lowbit.gemv_4bit(xb, m.weight.data, [32, 64], qs.absmax, qs.code, 64)
    assert torch.equal(out, (expected + m.bias.bfloat16()).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    for kind in ("nf4", "int8"):
        m = quantized_linear(kind)
        x = torch.randn(3, 64, dtype=dtype)
        out = m(x)
        assert out.dtype == dtype
        ref = F.linear(x.float(), _dequant(m), m.bias)
        torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)


# ---- autograd / training ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 4])
def test_gradients_flow_to_inputs(kind, rows):
    m = quantized_linear(kind)
    x = torch.randn(rows, 64, requires_grad=True)
    g = torch.randn(rows, 32)
    m(x).backward(g)
    torch.testing.assert_close(x.grad, g @ _dequant(m), atol=1e-4, rtol=1e-4)
    assert m.weight.grad is None and m.weight.dtype in (torch.uint8, torch.int8)


class _Block(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.up = quantized_linear(kind, 64, 32)
        self.down = quantized_linear(kind, 32, 64)
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_peft_lora_wraps_quantized_layers(kind):
    peft = pytest.importorskip("peft")
    model = _Block(kind)
    packed_before = model.up.weight.data.clone()
    model.is_loaded_in_4bit = kind != "int8"
    model.is_loaded_in_8bit = kind == "int8"
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model.up.weight.dtype in (torch.uint8, torch.int8)  # not cast to fp32
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    up = pm.base_model.model.up
    assert isinstance(up.base_layer, (Linear4bit, Linear8bitLt))
    torch.nn.init.normal_(up.lora_B["default"].weight)  # LoRA B starts at zero: make it count
    x = torch.randn(3, 64)
    out = pm(x)
    out.sum().backward()
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)
    assert torch.equal(up.base_layer.weight.data, packed_before)
    # the adapter changes the output: LoRA is live on top of the quantized layer
    with pm.disable_adapter():
        assert not torch.allclose(pm(x), out)


# ---- state dict -------------------------------------------------------------------------------


def test_4bit_state_dict_keys():
    sd = quantized_linear("nf4-dq").state_dict()
    assert sorted(sd) == [
        "bias",
        "weight",
        "weight.absmax",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    ]
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (32 * 64 // 2, 1)
    assert sorted(quantized_linear("fp4").state_dict()) == [
        "bias",
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.quant_state.bitsandbytes__fp4",
    ]


def test_8bit_state_dict_keys():
    sd = quantized_linear("int8").state_dict()
    assert sorted(sd) == ["SCB", "bias", "weight", "weight_format"]
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (32, 64)
    assert sd["SCB"].dtype == torch.float32 and sd["SCB"].shape == (32,)
    assert sd["weight_format"].item() == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_state_dict_round_trip_is_exact(kind, device):
    m = quantized_linear(kind)
    x1, x4 = torch.randn(1, 64), torch.randn(4, 64)
    fresh = empty_like_layer(m, device=device)
    assert not fresh.is_quantized
    fresh.load_state_dict(m.state_dict(), strict=True)
    assert fresh.is_quantized
    assert torch.equal(fresh(x1), m(x1)) and torch.equal(fresh(x4), m(x4))
    # and its own state dict is the same again
    a, b = m.state_dict(), fresh.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_float_state_dict_loads_and_quantizes_on_move():
    lin = float_linear()
    m = Linear4bit(64, 32, quant_type="nf4", device="meta")
    m.load_state_dict(lin.state_dict(), strict=True)
    assert not m.is_quantized and torch.equal(m.weight.data, lin.weight.data)
    m = m.to("cpu")
    assert m.is_quantized
    ref = Linear4bit.from_linear(lin, quant_type="nf4")
    x = torch.randn(3, 64)
    assert torch.equal(m(x), ref(x))


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_pickle_and_moves_keep_quant_state(kind):
    m = quantized_linear(kind)
    x = torch.randn(3, 64)
    y = m(x)
    clone = copy.deepcopy(m)
    assert torch.equal(clone(x), y)
    assert clone.weight.data_ptr() != m.weight.data_ptr()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.weight) is type(m.weight)
    assert torch.equal(loaded(x), y)
    moved = copy.deepcopy(m).to("cpu").cpu()
    assert torch.equal(moved(x), y)


@pytest.mark.parametrize("kind", KINDS)
def test_to_dtype_changes_compute_only(kind):
    m = quantized_linear(kind, **({} if kind == "int8" else {"compute_dtype": torch.float32}))
    before = m.state_dict()
    h = copy.deepcopy(m).to(torch.bfloat16)
    after = h.state_dict()
    for k, v in before.items():
        if k == "bias":
            assert after[k].dtype == torch.bfloat16
        else:  # codes and scales untouched
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    if kind != "int8":
        assert h.compute_dtype == torch.bfloat16
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert h(x).dtype == torch.bfloat16
    torch.testing.assert_close(h(x).float(), m(x.float()), atol=0.05, rtol=0.02)
    h.half()  # .half() is also a dtype conversion and must not touch the codes
    assert torch.equal(h.weight.data, m.weight.data)


def test_float_quant_storage_survives_half():
    m = quantized_linear("nf4", quant_storage=torch.bfloat16)
    assert m.weight.dtype == torch.bfloat16
    packed = m.weight.data.view(torch.uint8).clone()
    x = torch.randn(2, 64)
    y = m(x)
    m.half().float()
    assert m.weight.dtype == torch.bfloat16 and torch.equal(m.weight.data.view(torch.uint8), packed)
    torch.testing.assert_close(m(x), y, atol=1e-2, rtol=1e-2)  # bias went through fp16


# ---- bad state dicts --------------------------------------------------------------------------


def test_4bit_data_into_8bit_layer_names_the_key():
    sd = quantized_linear("nf4").state_dict()
    with pytest.raises(RuntimeError, match=r"weight\.absmax.*4-bit.*Linear4bit"):
        Linear8bitLt(64, 32, has_fp16_weights=False, device="meta").load_state_dict(sd)


def test_8bit_data_into_4bit_layer_names_the_key():
    sd = quantized_linear("int8").state_dict()
    with pytest.raises(RuntimeError, match=r"SCB.*Linear8bitLt"):
        Linear4bit(64, 32, device="meta").load_state_dict(sd)


@pytest.mark.parametrize("key", ["weight.absmax", "weight.quant_map", "weight.nested_absmax"])
def test_missing_4bit_aux_key(key):
    sd = quantized_linear("nf4-dq").state_dict()
    del sd[key]
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        Linear4bit(64, 32, device="meta").load_state_dict(sd)


def test_missing_quant_state_json():
    sd = quantized_linear("nf4").state_dict()
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(RuntimeError, match=r"weight\.quant_state\.bitsandbytes__nf4"):
        Linear4bit(64, 32, device="meta").load_state_dict(sd)


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b'{"quant_type": "nf4", "blocksize": 63, "dtype": "float32", "shape": [32, 64]}',
    ],
)
def test_bad_quant_state_json(payload):
    sd = quantized_linear("nf4").state_dict()
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(payload), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"weight\.quant_state\.bitsandbytes__nf4"):
        Linear4bit(64, 32, device="meta").load_state_dict(sd)


def test_quant_state_for_another_shape():
    sd = quantized_linear("nf4", 64, 32).state_dict()
    with pytest.raises(RuntimeError, match=r"bitsandbytes__nf4.*\[32, 64\].*\[64, 64\]"):
        Linear4bit(64, 64, device="meta").load_state_dict(sd)


def test_missing_scb():
    sd = quantized_linear("int8").state_dict()
    del sd["SCB"]
    with pytest.raises(RuntimeError, match=r"SCB: missing"):
        Linear8bitLt(64, 32, device="meta").load_state_dict(sd)


def test_bad_weight_format():
    sd = quantized_linear("int8").state_dict()
    sd["weight_format"] = torch.tensor(2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"weight_format"):
        Linear8bitLt(64, 32, device="meta").load_state_dict(sd)


def test_unexpected_key_is_reported_when_strict():
    sd = quantized_linear("int8").state_dict()
    sd["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="extra"):
        Linear8bitLt(64, 32, device="meta").load_state_dict(sd, strict=True)
    Linear8bitLt(64, 32, device="meta").load_state_dict(sd, strict=False)


# ---- file sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, bound", [("nf4", 0.29), ("nf4-dq", 0.29), ("int8", 0.55)])
def test_saved_size_against_16bit(tmp_path, kind, bound):
    from safetensors.torch import save_file

    m = quantized_linear(kind, 1024, 1024)
    half = {k: v.half() for k, v in float_linear(1024, 1024).state_dict().items()}
    save_file(half, tmp_path / "fp16.safetensors")
    save_file(m.state_dict(), tmp_path / "q.safetensors")
    ratio = (tmp_path / "q.safetensors").stat().st_size / (
        tmp_path / "fp16.safetensors"
    ).stat().st_size
    assert ratio < bound


# ---- bitsandbytes compatibility ---------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
def test_4bit_state_dict_identical_to_bitsandbytes(quant_type, double):
    bnb = pytest.importorskip("bitsandbytes")
    lin = float_linear()
    theirs = bnb.nn.Linear4bit(64, 32, quant_type=quant_type, compress_statistics=double)
    theirs.load_state_dict(lin.state_dict())
    theirs = theirs.to("cpu")
    ours = Linear4bit.from_linear(lin, quant_type=quant_type, compress_statistics=double)
    a, b = theirs.state_dict(), ours.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # and a bitsandbytes state dict loads into our layer, decoding to bnb's own dequantization
    fresh = Linear4bit(64, 32, device="meta")
    fresh.load_state_dict(a)
    w_bnb = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(fresh.dequantize(torch.float32), w_bnb)


def test_8bit_state_dict_identical_to_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    lin = float_linear()
    with torch.no_grad():  # bitsandbytes quantizes from fp16: use fp16-exact weights
        lin.weight.copy_(lin.weight.half().float())
    theirs = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0)
    theirs.load_state_dict(lin.state_dict())
    theirs = theirs.to("cpu")
    ours = Linear8bitLt.from_linear(lin, threshold=6.0)
    a, b = theirs.state_dict(), ours.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fresh = Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0, device="meta")
    fresh.load_state_dict(a)
    assert torch.equal(fresh.weight.data, theirs.weight.data)
    assert torch.equal(fresh.weight.SCB, theirs.weight.SCB)
    # bitsandbytes' CPU path multiplies by the dequantized weight; ours also quantizes the
    # activations (LLM.int8()), so outputs agree to within activation rounding.
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), theirs(x), atol=0.03, rtol=0.05)


# ---- parameters -------------------------------------------------------------------------------


def test_params_are_integer_and_frozen():
    p4 = quantized_linear("nf4").weight
    p8 = quantized_linear("int8").weight
    assert isinstance(p4, Params4bit) and p4.dtype == torch.uint8 and not p4.requires_grad
    assert isinstance(p8, Int8Params) and p8.dtype == torch.int8 and not p8.requires_grad
    assert torch.equal(p8.CB, p8.data)


def test_params_accept_accelerate_style_reconstruction():
    # Accelerate rebuilds parameters as cls(tensor, **old.__dict__)
    p = quantized_linear("nf4-dq").weight
    q = type(p)(p.data, requires_grad=False, **p.__dict__)
    assert q.bnb_quantized and q.quant_state is p.quant_state
    p8 = quantized_linear("int8").weight
    q8 = type(p8)(p8.data, requires_grad=True, **p8.__dict__)  # int8 cannot require grad
    assert q8.has_codes and not q8.requires_grad


def test_torch_compile_fullgraph():
    for kind in ("nf4-dq", "int8"):
        m = quantized_linear(kind)
        x = torch.randn(4, 64)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), m(x))
