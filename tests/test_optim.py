"""lowbit.optim: the fused update ops against their pure-torch reference (codes and absmax bit-exact,
parameters bit-exact too: the kernels and the reference perform the same fp32 operations; the stated
tolerance is 0), the optimizers' API, state dicts, overrides and the NaN/Inf policy."""

import copy
import math
import warnings

import pytest
import torch

import lowbit.optim as O
from lowbit._codes import create_dynamic_map
from lowbit.optim import reference as R

ops = torch.ops.lowbit
KINDS = ["adam", "momentum", "rmsprop", "lion"]
SIZES = [1, 255, 256, 257, 4096, 4096 * 5 + 77]  # odd sizes and partial blocks
Q1 = create_dynamic_map(signed=True)
Q2 = create_dynamic_map(signed=False)
HYPER = dict(beta1=0.9, beta2=0.99, eps=1e-8, lr=1e-2)


def _states8(kind, n, gen):
    """Plausible 8-bit states: the codes of real fp32 states (m signed, v >= 0)."""
    m = torch.randn(n, generator=gen) * 0.1
    q1, a1 = ops.quantize_blockwise(m.abs() if kind == "rmsprop" else m, Q1, 256)
    two = kind == "adam"
    if two:
        q2, a2 = ops.quantize_blockwise(torch.rand(n, generator=gen) * 0.01, Q2, 256)
    else:
        q2 = a2 = None
    return q1, a1, q2, a2


def _run_8bit(fn, kind, g, p, st, **kw):
    q1, a1, q2, a2 = st
    two = kind == "adam"
    return fn(
        kind,
        g,
        p,
        q1,
        q2 if two else [],
        a1,
        a2 if two else [],
        Q1,
        Q2 if two else None,
        **kw,
    )


def _clone(xs):
    return [None if x is None else [t.clone() for t in x] for x in xs]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_8bit_kernel_matches_reference(kind, n, pdtype):
    gen = torch.Generator().manual_seed(n)
    gdtype = torch.float32 if pdtype == torch.float16 else pdtype  # mixed g / p dtypes too
    p = [torch.randn(n, generator=gen).to(pdtype), torch.randn(3, n, generator=gen).to(pdtype)]
    g = [
        torch.randn(n, generator=gen).to(gdtype) * 0.1,
        torch.randn(3, n, generator=gen).to(gdtype),
    ]
    states = [_states8(kind, t.numel(), gen) for t in p]
    # lists per state: [q1s, a1s, q2s, a2s]
    st = [[s[j] for s in states] if states[0][j] is not None else None for j in range(4)]
    for step, wd, skip in ((1, 0.0, False), (7, 0.01, False), (3, 0.1, True)):
        if skip:
            for t in g:
                t.view(-1)[::3] = 0
        kw = dict(HYPER, step=step, weight_decay=wd, gnorm_scale=0.75, skip_zeros=skip)
        p_k, st_k = [t.clone() for t in p], _clone(st)
        p_r, st_r = [t.clone() for t in p], _clone(st)
        applied = _run_8bit(ops.optimizer_update_8bit_blockwise, kind, g, p_k, st_k, **kw)
        _run_8bit(R.optimizer_update_8bit_blockwise, kind, g, p_r, st_r, **kw)
        assert applied.tolist() == [True, True]
        for a, b in zip(p_k, p_r):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for xs, ys in zip(st_k, st_r):
            for a, b in zip(xs or [], ys or []):
                assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan())
        p, st = p_k, st_k  # continue from the updated state


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_32bit_kernel_matches_reference(kind, pdtype):
    gen = torch.Generator().manual_seed(1)
    n = 4096 + 13
    p = [torch.randn(n, generator=gen).to(pdtype)]
    g = [torch.randn(n, generator=gen).to(pdtype)]
    s1 = [torch.rand(n, generator=gen) * 0.1]
    s2 = [torch.rand(n, generator=gen) * 0.01] if kind == "adam" else []
    for step in (1, 2, 5):
        kw = dict(HYPER, step=step, weight_decay=0.01)
        pk, s1k, s2k = [p[0].clone()], [s1[0].clone()], [t.clone() for t in s2]
        ops.optimizer_update_32bit(kind, g, pk, s1k, s2k, **kw)
        R.optimizer_update_32bit(kind, g, p, s1, s2, **kw)
        assert torch.equal(pk[0], p[0]) and torch.equal(s1k[0], s1[0])
        assert all(torch.equal(a, b) for a, b in zip(s2k, s2))


def test_isa_paths_agree(monkeypatch):
    """The AVX2 and the generic element loops give the same bits (checked through the reference on
    whichever path this machine runs; the generic one runs in a subprocess)."""
    import subprocess
    import sys

    code = (
        "import torch, lowbit\n"
        "from lowbit._codes import create_dynamic_map as c\n"
        "g=torch.Generator().manual_seed(0); n=5000\n"
        "p=[torch.randn(n,generator=g).bfloat16()]; gr=[torch.randn(n,generator=g)]\n"
        "s=[torch.zeros(n,dtype=torch.uint8)]; s2=[torch.zeros(n,dtype=torch.uint8)]\n"
        "a=[torch.zeros(20)]; a2=[torch.zeros(20)]\n"
        "for t in range(1,4): torch.ops.lowbit.optimizer_update_8bit_blockwise('adam',gr,p,s,s2,a,a2,"
        "c(True),c(False),0.9,0.99,1e-8,t,1e-2,0.01,1.0,False,123)\n"
        "print(hash(p[0].view(torch.int16).numpy().tobytes()), hash(s[0].numpy().tobytes()),"
        " hash(s2[0].numpy().tobytes()))\n"
    )
    out = {}
    for isa in ("generic", "auto"):
        env = dict(__import__("os").environ, LOWBIT_CPU_ISA=isa, PYTHONHASHSEED="0")
        out[isa] = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
    assert out["generic"] == out["auto"]


def test_non_contiguous_grad_and_empty():
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(64, 80, generator=gen)
    g = torch.randn(80, 64, generator=gen).t()  # non-contiguous
    q1, a1, q2, a2 = _states8("adam", p.numel(), gen)
    outs = []
    for grad in (g, g.contiguous()):
        pp, s = p.clone(), [q1.clone(), a1.clone(), q2.clone(), a2.clone()]
        ops.optimizer_update_8bit_blockwise(
            "adam", [grad], [pp], [s[0]], [s[2]], [s[1]], [s[3]], Q1, Q2, **HYPER, step=1
        )
        outs.append((pp, s))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    e = torch.empty(0)
    r = ops.optimizer_update_8bit_blockwise(
        "lion",
        [e],
        [e.clone()],
        [torch.empty(0, dtype=torch.uint8)],
        [],
        [torch.empty(0)],
        [],
        Q1,
        None,
        **HYPER,
        step=1,
    )
    assert r.tolist() == [True]
    assert (
        ops.optimizer_update_8bit_blockwise(
            "lion", [], [], [], [], [], [], Q1, None, **HYPER, step=1
        ).numel()
        == 0
    )


# ---- stochastic rounding --------------------------------------------------------------------------


def test_stochastic_rounding_matches_reference_and_is_unbiased():
    n = 20000
    x = torch.full((n,), 1.0 + 2.0**-10)  # 1/8 of a bf16 ulp above 1.0: RNE always gives 1.0
    sr = R.to_bfloat16_stochastic(x, 99).float()
    frac = ((sr - 1.0) / 2.0**-7).mean().item()  # bf16 ulp at 1.0 is 2^-7
    assert abs(frac - 0.125) < 0.01
    # The kernel: momentum step with lr such that p + update = x exactly, p bf16.
    p = [torch.ones(n, dtype=torch.bfloat16)]
    g = [torch.full((n,), -(2.0**-10))]
    s1 = [torch.zeros(n)]
    ops.optimizer_update_32bit("momentum", g, p, s1, [], 0.9, 0.0, 0.0, 1, 1.0, sr_seed=99)
    assert torch.equal(p[0].float(), sr)
    # Off: round to nearest even.
    p = [torch.ones(n, dtype=torch.bfloat16)]
    ops.optimizer_update_32bit("momentum", g, p, [torch.zeros(n)], [], 0.9, 0.0, 0.0, 1, 1.0)
    assert torch.equal(p[0].float(), torch.ones(n))


def test_stochastic_rounding_optimizer_moves_bf16_weights():
    """With lr * update far below a bf16 ulp, round-to-nearest never moves the weights;
    stochastic rounding moves them by the right amount on average."""
    torch.manual_seed(0)
    res = {}
    for sr in (False, True):
        w = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
        opt = O.SGD8bit([w], lr=2.0**-12, momentum=0.5, stochastic_rounding=sr)
        for _ in range(64):
            w.grad = torch.ones_like(w)
            opt.step()
        res[sr] = w.float().mean().item()
    assert res[False] == 1.0
    # momentum 0.5: m -> 2 after a few steps; 64 steps move ~ 64 * 2 * 2^-12 = 0.031
    assert 0.95 < res[True] < 0.985


# ---- NaN / Inf ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_grad_skips_parameter_with_warning(bad):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5000))
    b = torch.nn.Parameter(torch.randn(5000))
    opt = O.AdamW8bit([a, b], lr=1e-2)
    a.grad, b.grad = torch.randn(5000), torch.randn(5000)
    opt.step()
    before_a = (a.detach().clone(), copy.deepcopy(opt.state[a]))
    before_b = b.detach().clone()
    a.grad = torch.randn(5000)
    a.grad[1234] = bad
    b.grad = torch.randn(5000)
    with pytest.warns(
        RuntimeWarning, match=r"parameter 0 of param_groups\[0\].*NaN or Inf.*skipped"
    ):
        opt.step()
    assert torch.equal(a, before_a[0])
    for k in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(opt.state[a][k], before_a[1][k])
    assert opt.state[a]["step"] == 1 and opt.state[b]["step"] == 2
    assert not torch.equal(b, before_b)  # the other parameter was updated


def test_nonfinite_grad_32bit_and_op_flag():
    p = [torch.randn(300), torch.randn(300)]
    g = [torch.randn(300), torch.randn(300)]
    g[1][7] = float("-inf")
    before = [t.clone() for t in p]
    s1 = [torch.zeros(300), torch.zeros(300)]
    s2 = [torch.zeros(300), torch.zeros(300)]
    applied = ops.optimizer_update_32bit("adam", g, p, s1, s2, **HYPER, step=1)
    assert applied.tolist() == [True, False]
    assert torch.equal(p[1], before[1]) and not torch.equal(p[0], before[0])
    assert not s1[1].any() and not s2[1].any()


# ---- bad input ------------------------------------------------------------------------------------


def test_op_bad_input():
    p, g = [torch.randn(300)], [torch.randn(300)]
    s = [torch.zeros(300, dtype=torch.uint8)]
    a = [torch.zeros(2)]
    call = ops.optimizer_update_8bit_blockwise
    with pytest.raises(ValueError, match="optimizer_name must be"):
        call("adamax", g, p, s, s, a, a, Q1, Q2, **HYPER, step=1)
    with pytest.raises(ValueError, match="qmap2 is required"):
        call("adam", g, p, s, s, a, a, Q1, None, **HYPER, step=1)
    with pytest.raises(ValueError, match="state2 must hold 0 tensors"):
        call("lion", g, p, s, s, a, a, Q1, None, **HYPER, step=1)
    with pytest.raises(ValueError, match=r"absmax1\[0\] must hold 2 elements"):
        call("lion", g, p, s, [], [torch.zeros(3)], [], Q1, None, **HYPER, step=1)
    with pytest.raises(TypeError, match=r"state1\[0\] must be torch.uint8"):
        call("lion", g, p, [torch.zeros(300)], [], a, [], Q1, None, **HYPER, step=1)
    with pytest.raises(ValueError, match="step must be >= 1"):
        call("lion", g, p, s, [], a, [], Q1, None, **HYPER, step=0)
    with pytest.raises(ValueError, match=r"p\[0\] must be contiguous"):
        call(
            "lion",
            [torch.randn(20, 15)],
            [torch.randn(15, 20).t()],
            s,
            [],
            a,
            [],
            Q1,
            None,
            **HYPER,
            step=1,
        )
    with pytest.raises(ValueError, match="qmap1 must be sorted"):
        call("lion", g, p, s, [], a, [], Q1.flip(0), None, **HYPER, step=1)
    with pytest.raises(ValueError, match=r"g\[0\] has 299 elements but p\[0\] has 300"):
        call("lion", [torch.randn(299)], p, s, [], a, [], Q1, None, **HYPER, step=1)
    with pytest.raises(TypeError, match=r"p\[0\] must be float32, float16 or bfloat16"):
        call(
            "lion",
            g,
            [torch.zeros(300, dtype=torch.float64)],
            s,
            [],
            a,
            [],
            Q1,
            None,
            **HYPER,
            step=1,
        )
    with pytest.raises(ValueError, match="beta1 must be in"):
        ops.optimizer_update_32bit("lion", g, p, [torch.zeros(300)], [], 1.0, 0.9, 0.0, 1, 1e-3)


def test_optimizer_bad_arguments():
    w = [torch.nn.Parameter(torch.randn(10))]
    with pytest.raises(ValueError, match="amsgrad"):
        O.Adam8bit(w, amsgrad=True)
    with pytest.raises(ValueError, match="always keeps 8-bit"):
        O.AdamW8bit(w, optim_bits=8)
    with pytest.raises(ValueError, match="block_wise=False"):
        O.Adam(w, block_wise=False)
    with pytest.raises(ValueError, match="betas"):
        O.Lion8bit(w, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        O.AdamW8bit(w, lr=-1.0)
    with pytest.raises(ValueError, match="momentum > 0"):
        O.SGD8bit(w, lr=0.1)
    with pytest.raises(ValueError, match="nesterov"):
        O.SGD8bit(w, lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="centered"):
        O.RMSprop8bit(w, centered=True)
    with pytest.raises(ValueError, match="optim_bits must be 8 or 32"):
        O.Adam(w, optim_bits=4)
    with pytest.raises(ValueError, match="percentile_clipping"):
        O.Adam(w, percentile_clipping=0)
    with pytest.raises(ValueError, match="unknown optimizer setting"):
        O.GlobalOptimManager.get_instance().override_config(w[0], "betaz", 3)


# ---- optimizers -----------------------------------------------------------------------------------


def _train(opt_cls, steps=30, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4)
    ).to(dtype)
    x = torch.randn(256, 64).to(dtype)
    y = (x[:, :4].float() * 3).argmax(1)
    opt = opt_cls(model.parameters(), **kw)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


@pytest.mark.parametrize(
    "cls,kw",
    [
        (O.Adam8bit, dict(lr=1e-2)),
        (O.AdamW8bit, dict(lr=1e-2)),
        (O.Lion8bit, dict(lr=5e-3)),
        (O.SGD8bit, dict(lr=0.1, momentum=0.9)),
        (O.RMSprop8bit, dict(lr=1e-3)),
        (O.Adam32bit, dict(lr=1e-2)),
        (O.AdamW, dict(lr=1e-2, optim_bits=8)),
        (O.Lion32bit, dict(lr=5e-3)),
        (O.SGD32bit, dict(lr=0.1, momentum=0.9)),
        (O.RMSprop32bit, dict(lr=1e-3)),
    ],
)
def test_optimizers_train(cls, kw):
    model, opt, losses = _train(cls, min_8bit_size=1024, **kw)
    assert losses[-1] < 0.5 * losses[0]
    first = opt.state[model[0].weight]
    eight = cls.__name__.endswith("8bit") or kw.get("optim_bits") == 8
    assert first["state1"].dtype == (torch.uint8 if eight else torch.float32)
    assert opt.state[model[0].bias]["state1"].dtype == torch.float32  # below min_8bit_size


def test_8bit_follows_32bit_closely():
    _, _, l8 = _train(O.AdamW8bit, lr=5e-3, min_8bit_size=1024)
    _, _, l32 = _train(O.AdamW32bit, lr=5e-3)
    _, _, lt = _train(torch.optim.AdamW, lr=5e-3, eps=1e-8)
    assert abs(l32[-1] - lt[-1]) <= 1e-4 * lt[-1] + 1e-6
    assert abs(l8[-1] - lt[-1]) <= 0.05 * lt[-1] + 1e-3


def test_adamw32bit_equals_torch_adamw_formula():
    """One step of AdamW32bit on fp32 equals torch.optim.AdamW up to fp32 rounding."""
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(1000))
    w2 = torch.nn.Parameter(w1.detach().clone())
    o1, o2 = (
        O.AdamW32bit([w1], lr=1e-2, weight_decay=0.1),
        torch.optim.AdamW([w2], lr=1e-2, weight_decay=0.1),
    )
    for _ in range(5):
        g = torch.randn(1000)
        w1.grad, w2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)


def test_bf16_params_train():
    _, opt, losses = _train(
        O.AdamW8bit, dtype=torch.bfloat16, lr=1e-2, min_8bit_size=1024, stochastic_rounding=True
    )
    assert losses[-1] < 0.6 * losses[0]


def test_percentile_clipping_scales_outlier_gradients():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(5000))
    opt = O.SGD32bit([w], lr=1.0, momentum=0.5, percentile_clipping=50)
    for _ in range(10):
        w.grad = torch.ones(5000)
        opt.step()
    before = w.detach().clone()
    m_before = opt.state[w]["state1"].clone()
    w.grad = torch.full((5000,), 100.0)  # 100x the usual norm: clipped to the median norm
    opt.step()
    # m = 0.5 * m + g * scale, scale = 1 / 100
    torch.testing.assert_close(opt.state[w]["state1"], 0.5 * m_before + 1.0)
    torch.testing.assert_close(w.detach(), before - opt.state[w]["state1"])
    assert opt.state[w]["gnorm_vec"].shape == (100,)


def test_closure_and_no_grad_params():
    w = torch.nn.Parameter(torch.randn(10))
    frozen = torch.nn.Parameter(torch.randn(10))
    opt = O.Adam8bit([w, frozen])

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0 and frozen not in opt.state and opt.state[w]["step"] == 1


# ---- state dicts ----------------------------------------------------------------------------------


def test_state_dict_layout_and_round_trip():
    model, opt, _ = _train(O.AdamW8bit, steps=3, lr=1e-2, min_8bit_size=1024)
    sd = opt.state_dict()
    st0 = sd["state"][0]
    assert st0["step"] == 3
    inner = st0["__bnb_optimizer_quant_state__"]
    assert set(inner) == {"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}
    assert inner["state1"].dtype == torch.uint8 and inner["state1"].shape == model[0].weight.shape
    assert inner["absmax1"].shape == (math.ceil(model[0].weight.numel() / 256),)
    assert torch.equal(inner["qmap1"], Q1) and torch.equal(inner["qmap2"], Q2)
    assert set(sd["state"][1]["__bnb_optimizer_quant_state__"]) == {
        "state1",
        "state2",
    }  # bias: fp32
    # Continue training from the saved state in a fresh optimizer: identical to continuing here.
    model2 = copy.deepcopy(model)
    opt2 = O.AdamW8bit(model2.parameters(), lr=1e-2, min_8bit_size=1024)
    opt2.load_state_dict(sd)
    x = torch.randn(16, 64)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    # The flat layout (state tensors next to 'step') loads too.
    flat = copy.deepcopy(sd)
    for st in flat["state"].values():
        st.update(st.pop("__bnb_optimizer_quant_state__"))
    opt2.load_state_dict(flat)
    assert torch.equal(opt2.state[model2[0].weight]["state1"], inner["state1"])
    assert opt2.state[model2[0].weight]["step"] == 3


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda st: st.pop("absmax1"), "lacks 'absmax1'"),
        (lambda st: st.pop("state2"), "lacks 'state2'"),
        (lambda st: st.pop("qmap2"), "lacks 'qmap2'"),
        (
            lambda st: st.__setitem__("absmax2", torch.zeros(3)),
            "'absmax2' holds 3 values, expected",
        ),
        (
            lambda st: st.__setitem__("state1", torch.zeros(7, dtype=torch.uint8)),
            "'state1' holds 7 values",
        ),
        (
            lambda st: st.__setitem__("state2", st["state2"].float()),
            "both states must be 8-bit or both 32-bit",
        ),
        (
            lambda st: st.__setitem__("state1", st["state1"].to(torch.int32)),
            "must be uint8 .* or float32",
        ),
        (lambda st: st.pop("step"), "lacks 'step'"),
    ],
)
def test_load_state_dict_errors(mutate, match):
    model, opt, _ = _train(O.AdamW8bit, steps=1, lr=1e-2, min_8bit_size=1024)
    sd = opt.state_dict()
    st = sd["state"][0]
    st.update(st.pop("__bnb_optimizer_quant_state__"))
    mutate(st)
    opt2 = O.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1024)
    with pytest.raises(ValueError, match=match):
        opt2.load_state_dict(sd)


def test_load_state_dict_group_mismatch():
    model, opt, _ = _train(O.Lion8bit, steps=1, lr=1e-3, min_8bit_size=1024)
    sd = opt.state_dict()
    opt2 = O.Lion8bit(list(model.parameters())[:2], lr=1e-3)
    with pytest.raises(
        ValueError, match="parameter group 0 has 4 parameters in the state dict and 2"
    ):
        opt2.load_state_dict(sd)
    opt3 = O.Lion8bit(
        [{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}]
    )
    with pytest.raises(ValueError, match="has 1 parameter groups, the optimizer 2"):
        opt3.load_state_dict(sd)


# ---- GlobalOptimManager ---------------------------------------------------------------------------


@pytest.fixture
def fresh_manager():
    O.GlobalOptimManager._instance = None
    yield O.GlobalOptimManager.get_instance()
    O.GlobalOptimManager._instance = None


def test_manager_override_config(fresh_manager):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(1000, 32)
    lin = torch.nn.Linear(32, 256)
    params = list(emb.parameters()) + list(lin.parameters())
    fresh_manager.register_parameters(params)
    fresh_manager.override_config(emb.weight, "optim_bits", 32)
    fresh_manager.override_config([lin.weight], key_value_dict={"lr": 0.0})
    opt = O.Adam8bit(params, lr=1e-2)
    w_before = lin.weight.detach().clone()
    (emb(torch.arange(10)) @ lin.weight.t()).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["state1"].dtype == torch.float32
    assert opt.state[lin.weight]["state1"].dtype == torch.uint8
    assert torch.equal(lin.weight, w_before)  # lr overridden to 0
    with pytest.raises(RuntimeError, match="get_instance"):
        O.GlobalOptimManager()


def test_manager_module_override(fresh_manager):
    class Emb(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(500, 16))
            O.GlobalOptimManager.get_instance().register_module_override(
                self, "weight", {"optim_bits": 32}
            )

    e, lin = Emb(), torch.nn.Linear(16, 400)
    opt = O.AdamW8bit(list(e.parameters()) + list(lin.parameters()))
    (e.weight @ lin.weight.t()).sum().backward()
    opt.step()
    assert opt.state[e.weight]["state1"].dtype == torch.float32
    assert opt.state[lin.weight]["state1"].dtype == torch.uint8


# ---- torch.library checks -------------------------------------------------------------------------


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    n = 700
    q1, a1, q2, a2 = _states8("adam", n, gen)
    args8 = (
        "adam",
        [torch.randn(n)],
        [torch.randn(n)],
        [q1],
        [q2],
        [a1],
        [a2],
        Q1,
        Q2,
        0.9,
        0.99,
        1e-8,
        2,
        1e-3,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.library.opcheck(ops.optimizer_update_8bit_blockwise.default, args8)
        args32 = (
            "lion",
            [torch.randn(n)],
            [torch.randn(n)],
            [torch.randn(n)],
            [],
            0.9,
            0.99,
            0.0,
            1,
            1e-3,
        )
        torch.library.opcheck(ops.optimizer_update_32bit.default, args32)


# ---- Transformers' Trainer ------------------------------------------------------------------------


def test_transformers_trainer(tmp_path):
    """optimizers=(lowbit.optim.AdamW8bit(...), None): Trainer builds its scheduler around it, steps
    it, and saves and reloads its state dict with a checkpoint."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    ids = torch.randint(0, 100, (32, 12))
    labels = (ids[:, 0] > 50).long()
    ds = [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(12, dtype=torch.long),
            "labels": labels[i],
        }
        for i in range(32)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, save_steps=3, report_to=[],
        use_cpu=True, logging_steps=100, disable_tqdm=True,
    )  # fmt: skip
    opt = O.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=1024)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
    trainer.train()
    w = model.bert.encoder.layer[0].attention.self.query.weight
    assert opt.state[w]["state1"].dtype == torch.uint8 and opt.state[w]["step"] == 6
    saved = torch.load(tmp_path / "checkpoint-6" / "optimizer.pt", weights_only=False)
    opt2 = O.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=1024)
    opt2.load_state_dict(saved)
    assert torch.equal(opt2.state[w]["state1"], opt.state[w]["state1"])


def test_optimizer_settings_checked_where_given():
    """Settings a kernel would read wrongly are refused up front, naming the argument: a betas of
    one value used to run Adam/Lion with beta2 = 0 silently; a fractional percentile_clipping
    failed only at a later step; an 'alpha' override (AdEMAMix) was accepted and ignored."""
    w = [torch.nn.Parameter(torch.randn(10))]
    for cls in (O.Adam8bit, O.AdamW, O.Lion8bit):
        with pytest.raises(ValueError, match="betas must be two numbers"):
            cls(w, betas=(0.9,))
        with pytest.raises(ValueError, match="betas must be two numbers"):
            cls(w, betas=(0.9, 0.99, 0.5))
    with pytest.raises(TypeError, match="eps must be a number"):
        O.AdamW8bit(w, eps="1e-8")
    with pytest.raises(TypeError, match="weight_decay must be a number"):
        O.AdamW8bit(w, weight_decay="0.1")
    with pytest.raises(TypeError, match="percentile_clipping must be an int"):
        O.AdamW8bit(w, percentile_clipping=95.5)
    with pytest.raises(TypeError, match="min_8bit_size must be an int"):
        O.AdamW8bit(w, min_8bit_size="4096")
    with pytest.raises(ValueError, match="always keeps 32-bit"):
        O.Lion32bit(w, optim_bits=8)
    with pytest.raises(ValueError, match="always keeps 8-bit"):
        O.SGD8bit(w, lr=0.1, momentum=0.9, optim_bits=8)
    mng = O.GlobalOptimManager.get_instance()
    with pytest.raises(ValueError, match="betas must be two numbers"):
        mng.override_config(w[0], "betas", (0.9,))
    with pytest.raises(ValueError, match="lr must be a finite number"):
        mng.override_config(w[0], "lr", -1.0)
    with pytest.raises(ValueError, match="unknown optimizer setting"):
        mng.override_config(w[0], "alpha", 0.5)
    assert id(w[0]) not in mng.pid2config
    # bitsandbytes' string form of betas still parses
    assert O.Adam8bit(w, betas="(0.8, 0.9)").param_groups[0]["betas"] == (0.8, 0.9)
    # numpy scalars (from configs) are numbers too
    np = pytest.importorskip("numpy")
    O.AdamW8bit(w, lr=np.float32(1e-3), eps=np.float64(1e-8), min_8bit_size=np.int64(64))
