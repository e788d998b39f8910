"""PEFT LoRA on LinearAffine: tiny Llama checkpoints in GPTQ (act-order g_idx) and
compressed-tensors format, loaded by lowbit, wrapped by get_peft_model with a plain LoraConfig,
trained a few steps, merged (re-quantized and dense), saved; bad configurations refused."""

import copy

import pytest
import torch

import _helpers_formats as hf

peft = pytest.importorskip("peft", reason="LoRA needs peft")
transformers = pytest.importorskip("transformers", reason="the tiny models are Transformers models")

import lowbit  # noqa: E402
from lowbit import reference  # noqa: E402
from lowbit.integrations.peft import LoraLinearAffine, merge_and_unload  # noqa: E402
from lowbit.nn import LinearAffine  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
BUFFERS = ("packed", "scales", "zeros", "perm")


def _write_gptq(model, path):  # act-order: every layer holds a permutation
    return hf.write_gptq(model, path, bits=4, group_size=32, sym=False, act_order=True)


def _write_ct(model, path):
    return hf.write_compressed_tensors(model, path, num_bits=4, group_size=32, symmetric=False)


WRITERS = {"gptq-act-order": _write_gptq, "compressed-tensors": _write_ct}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    model = hf.tiny_llama(hidden=64, inter=128)
    out = {}
    for name, write in WRITERS.items():
        if name == "compressed-tensors":
            pytest.importorskip("compressed_tensors", reason="the oracle writer needs it")
        path = tmp_path_factory.mktemp(name)
        write(model, path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def ids():
    # 4 x 12 = 48 tokens: more than 32 rows, so the CPU product keeps fp32 activations and a
    # dense merge can be compared to the unmerged model at fp32 rounding.
    return torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(3))


def _load(path):
    return lowbit.from_pretrained(path, torch_dtype=torch.float32, progress=False)


def _lora(**kw):
    kw = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS, **kw}
    return peft.LoraConfig(**kw)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits.float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _affine_state(model):
    return {
        f"{n}.{b}": getattr(m, b).clone()
        for n, m in model.named_modules()
        if isinstance(m, LinearAffine)
        for b in BUFFERS
        if getattr(m, b) is not None
    }


def _affine(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearAffine)}


def _train(pm, ids, after_first_backward=None, steps=4):
    """AdamW steps on one batch (the model learning its own tokens); the losses."""
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    pm.train()
    losses = []
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        if after_first_backward is not None and not losses:
            after_first_backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_get_peft_model_wraps_linear_affine(checkpoints, ids, fmt):
    model = _load(checkpoints[fmt])
    before = _logits(model, ids)
    pm = peft.get_peft_model(model, _lora())
    attn = pm.base_model.model.model.layers[0].self_attn
    assert type(attn.q_proj) is LoraLinearAffine and isinstance(
        attn.q_proj.base_layer, LinearAffine
    )
    assert type(attn.k_proj) is LinearAffine  # not targeted
    if fmt == "gptq-act-order":
        assert attn.q_proj.base_layer.perm is not None
    # LoRA's B starts at zero: the wrapped model computes exactly what the base model did
    assert torch.equal(_logits(pm, ids), before)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    lora_a = attn.q_proj.lora_A["default"].weight
    assert lora_a.dtype == torch.float32 and lora_a.device == attn.q_proj.base_layer.packed.device


@pytest.mark.parametrize(
    ("fmt", "checkpointing"), [("gptq-act-order", True), ("compressed-tensors", False)]
)
def test_train_then_merge(checkpoints, ids, fmt, checkpointing):
    model = _load(checkpoints[fmt])
    assert model.quantization_method in ("gptq", "compressed-tensors") and model.is_loaded_in_4bit
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    pm = peft.get_peft_model(model, _lora())
    codes = _affine_state(pm)
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}

    def first_step():  # gradients reach the adapters (A's is 0 while B is), nothing else
        assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)
        grads_b = [p.grad for n, p in pm.named_parameters() if ".lora_B." in n]
        assert grads_b and all(g.abs().sum() > 0 for g in grads_b)
        assert all(p.grad is None for n, p in pm.named_parameters() if n in frozen)

    losses = _train(pm, ids, first_step)
    assert losses[-1] < losses[0] - 0.05, losses
    for m in _affine(pm).values():
        assert not any(getattr(m, b).requires_grad for b in BUFFERS if getattr(m, b) is not None)
    assert all(torch.equal(v, _affine_state(pm)[k]) for k, v in codes.items())
    after = dict(pm.named_parameters())
    assert all(torch.equal(after[n].detach(), p) for n, p in frozen.items())

    pm.eval()
    logits = _logits(pm, ids)
    deltas = {}
    for name, m in pm.named_modules():
        if isinstance(m, LoraLinearAffine):
            deltas[name.removeprefix("base_model.model.")] = (
                m.base_layer.dequantize() + m.get_delta_weight("default")
            )

    # Dense merge: float nn.Linear layers holding decode(W) + scaling * B @ A exactly; the same
    # product as the unmerged model up to fp32 rounding.
    dense = merge_and_unload(copy.deepcopy(pm), requantize=False)
    for name, W in deltas.items():
        layer = dense.get_submodule(name)
        assert type(layer) is torch.nn.Linear and torch.equal(layer.weight, W)
    assert _rel(_logits(dense, ids), logits) < 1e-5

    # Re-quantized merge: LinearAffine layers, same bits, group size and permutation, codes
    # equal to the reference quantizer's of decode(W) + delta in stored column order; logits
    # within that rounding.
    perms = {n: m.perm for n, m in _affine(pm).items()}
    merged = merge_and_unload(pm)
    for name, W in deltas.items():
        layer = merged.get_submodule(name)
        perm = perms["base_model.model." + name + ".base_layer"]
        assert type(layer) is LinearAffine and (layer.bits, layer.group_size) == (4, 32)
        if perm is None:
            assert layer.perm is None
        else:
            assert torch.equal(layer.perm, perm)
            W = W[:, perm]
        packed, scales, zeros = reference.quantize_affine(W.contiguous(), 4, 32, False)
        assert torch.equal(layer.packed, packed) and torch.equal(layer.scales, scales)
        assert torch.equal(layer.zeros, zeros)
    # One more 4-bit rounding of every merged weight: a delta smaller than half a quantization
    # step rounds away (keeping the checkpoint's groups keeps the rest of the weight on its grid).
    # On this tiny random model (logits ~0.2) that moves the logits by 2% (GPTQ) and 5% (c-t).
    rel = _rel(_logits(merged, ids), logits)
    assert rel < 0.1, rel
    assert not any(isinstance(m, LoraLinearAffine) for m in merged.modules())


def test_merge_unmerge_and_adapter_save(checkpoints, ids, tmp_path):
    path = checkpoints["gptq-act-order"]
    # init_lora_weights=False: random A and B, a nonzero delta without training; B scaled down so
    # that the delta is ~10% of the weight, as after fine-tuning (PEFT's random B alone makes it
    # several times the weight of this tiny model)
    pm = peft.get_peft_model(_load(path), _lora(init_lora_weights=False))
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(m, LoraLinearAffine):
                m.lora_B["default"].weight.mul_(0.03)
    codes = _affine_state(pm)
    logits = _logits(pm, ids)
    with pm.disable_adapter():
        base = _logits(pm, ids)
    assert _rel(logits, base) > 1e-3  # the adapters do something

    # PEFT's model-level merge refuses any model whose quantization_method is "gptq" (meant for
    # AutoGPTQ's kernels); the layers' own merge()/unmerge() work, and so does lowbit's
    # merge_and_unload.
    layers = [m for m in pm.modules() if isinstance(m, LoraLinearAffine)]
    for m in layers:
        m.merge()  # re-quantized in place, the adapters then bypassed
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.merged and q.base_layer.perm is not None
    # one more 4-bit rounding of each merged weight (see test_train_then_merge): measured 0.062
    assert _rel(_logits(pm, ids), logits) < 0.1
    for m in layers:
        m.unmerge()  # the original codes (and permutation) come back exactly
    assert not q.merged
    assert all(torch.equal(v, _affine_state(pm)[k]) for k, v in codes.items())
    assert torch.equal(_logits(pm, ids), logits)

    # The adapter is what a quantized model saves: it reloads onto a fresh lowbit model.
    pm.save_pretrained(tmp_path / "adapter")
    again = peft.PeftModel.from_pretrained(_load(path), tmp_path / "adapter")
    assert torch.equal(_logits(again, ids), logits)


def test_merged_model_saving(checkpoints, ids, tmp_path):
    path = checkpoints["compressed-tensors"]
    lora = _lora(init_lora_weights=False, target_modules="all-linear")
    pm = peft.get_peft_model(_load(path), lora)
    requantized = merge_and_unload(copy.deepcopy(pm))
    # PEFT's own PeftModel.merge_and_unload goes through the same layer merge
    theirs = copy.deepcopy(pm).merge_and_unload()
    assert _affine_state(theirs).keys() == _affine_state(requantized).keys()
    assert all(
        torch.equal(v, _affine_state(theirs)[k]) for k, v in _affine_state(requantized).items()
    )
    # still LinearAffine layers: refused as for any model loaded from these formats
    with pytest.raises(ValueError, match="LinearAffine"):
        requantized.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="LinearAffine"):
        lowbit.save_pretrained(requantized, tmp_path / "q")

    # Every quantized layer merged dense: a plain float model, saved and reloaded by Transformers.
    logits = _logits(pm, ids)
    dense = merge_and_unload(pm, requantize=False)
    assert not _affine(dense) and getattr(dense.config, "quantization_config", None) is None
    assert not dense.is_loaded_in_4bit
    dense.save_pretrained(tmp_path / "dense")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.equal(_logits(reloaded, ids), _logits(dense, ids))
    assert _rel(_logits(dense, ids), logits) < 1e-5


def test_unsupported_lora_configs_are_refused(checkpoints):
    path = checkpoints["gptq-act-order"]
    with pytest.raises(ValueError, match="plain LoRA only.*use_dora"):
        peft.get_peft_model(_load(path), _lora(use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        peft.get_peft_model(_load(path), _lora(init_lora_weights="pissa"))
    pm = peft.get_peft_model(_load(path), _lora())
    with pytest.raises(TypeError, match="requantize must be a bool"):
        merge_and_unload(pm, requantize="yes")


def _patched(fn) -> bool:
    return getattr(fn, "_lowbit_affine", False)


def test_dispatch_installed_whatever_the_import_order(monkeypatch):
    from peft.tuners import tuners_utils
    from peft.tuners.lora.model import LoraModel

    import lowbit.integrations

    # conftest imported lowbit before anything imported peft: the import hook installed both
    create = LoraModel.__dict__["_create_new_module"].__func__
    resolver = tuners_utils._maybe_include_all_linear_layers
    assert _patched(create) and _patched(resolver)
    # peft imported first: `import lowbit` (its _register_if_available) installs them at once;
    # monkeypatch puts the installed versions back afterwards
    monkeypatch.setattr(LoraModel, "_create_new_module", staticmethod(create.__wrapped__))
    monkeypatch.setattr(tuners_utils, "_maybe_include_all_linear_layers", resolver.__wrapped__)
    assert not _patched(LoraModel.__dict__["_create_new_module"].__func__)
    lowbit.integrations._register_if_available()
    assert _patched(LoraModel.__dict__["_create_new_module"].__func__)
    assert _patched(tuners_utils._maybe_include_all_linear_layers)
    lowbit.integrations._register_if_available()  # idempotent: wrapped once
    assert LoraModel.__dict__["_create_new_module"].__func__.__wrapped__ is create.__wrapped__


def test_partial_state_dict_keeps_the_permutation(checkpoints):
    # PEFT loads an adapter with load_state_dict(strict=False) and only LoRA keys: a LinearAffine
    # layer must keep its act-order permutation then, and drop it only for a state dict holding
    # its codes without one.
    layer = next(iter(_affine(_load(checkpoints["gptq-act-order"])).values()))
    perm = layer.perm.clone()
    layer.load_state_dict({}, strict=False)
    assert torch.equal(layer.perm, perm)
    state = {k: v for k, v in layer.state_dict().items() if k != "perm"}
    layer.load_state_dict(state)
    assert layer.perm is None


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; runs on the lent GPU machine"
)
def test_lora_on_cuda(checkpoints, ids):
    # The same flow on the GPU kernels: adapters follow the codes to the device, training moves
    # them, both merges run there (quantize_affine / dequantize_affine on CUDA).
    model = _load(checkpoints["gptq-act-order"]).to("cuda")
    pm = peft.get_peft_model(model, _lora())
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.device.type == "cuda"
    ids = ids.cuda()
    codes = _affine_state(pm)
    losses = _train(pm, ids)
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(v, _affine_state(pm)[k]) for k, v in codes.items())
    pm.eval()
    logits = _logits(pm, ids)
    W = q.base_layer.dequantize() + q.get_delta_weight("default")
    dense = merge_and_unload(copy.deepcopy(pm), requantize=False)
    layer = dense.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.weight.device.type == "cuda" and torch.equal(layer.weight, W)
    # cuBLAS vs the affine CUDA kernels, whose tensor-core tiers may round the activations
    assert _rel(_logits(dense, ids), logits) < 2e-2
    merged = merge_and_unload(pm)
    layer = merged.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, LinearAffine) and layer.packed.device.type == "cuda"
    assert _rel(_logits(merged, ids), logits) < 0.1


def test_importing_the_peft_integration_first_registers_without_a_warning():
    # `import lowbit.integrations.peft` before PEFT: its own `import peft...` fires lowbit's
    # import hook while the module is half-initialised. That used to warn "could not register"
    # (the module's last line installs the dispatcher anyway); it must be silent and installed.
    import subprocess
    import sys

    code = (
        "import lowbit.integrations.peft\n"
        "from peft.tuners import tuners_utils\n"
        "from peft.tuners.lora.model import LoraModel\n"
        "assert LoraModel._create_new_module._lowbit_affine\n"
        "assert tuners_utils._maybe_include_all_linear_layers._lowbit_affine\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "could not register" not in proc.stderr, proc.stderr
