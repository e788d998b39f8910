"""lowbit.optim against bitsandbytes' CPU optimizers (skipped when bitsandbytes is not importable).

What is held:
  * 32-bit optimizers: the same 50 steps from the same state give parameters within 1e-3 relative.
  * 8-bit optimizers, 50 steps where each step starts both libraries from the same state: the
    parameters agree within 1e-3 relative, and the new 8-bit codes are identical on >= 99.9% of the
    entries where bitsandbytes picked a nearest code. bitsandbytes' CPU quantizer does not always
    pick the nearest code (it searches a copy of the map with code[0] forced to -1, which for the
    unsigned map of the second state sends small values to code 7; and ~0.15% of signed values go
    to the second-nearest code), so wherever the codes differ lowbit's must be at least as near.
    Over 50 independent steps the trajectories drift apart through those picks (see
    benchmarks/bench_optim.py, which measures that too).
  * Checkpoints move both ways: a bitsandbytes state dict loads into lowbit and vice versa.
"""

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
bnb_F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")

import lowbit.optim as O  # noqa: E402
from lowbit._codes import create_dynamic_map  # noqa: E402
from lowbit.optim import reference as R  # noqa: E402

ops = torch.ops.lowbit
Q1 = create_dynamic_map(signed=True)
Q2 = create_dynamic_map(signed=False)
N = 256 * 96 + 40


def _grads(steps, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, generator=gen) * 0.01 * (1 + 0.5 * torch.randn(n, generator=gen))
        for _ in range(steps)
    ]


@pytest.mark.parametrize(
    "name,kw",
    [
        ("AdamW32bit", dict(lr=1e-3, weight_decay=0.01)),
        ("Adam32bit", dict(lr=1e-3)),
        ("Lion32bit", dict(lr=1e-4, weight_decay=0.01)),
        ("SGD32bit", dict(lr=1e-2, momentum=0.9)),
        ("RMSprop32bit", dict(lr=1e-3)),
    ],
)
def test_32bit_same_50_steps(name, kw):
    grads = _grads(50, N)
    p0 = torch.randn(N) * 0.05
    out = []
    for lib in (O, bnb.optim):
        w = torch.nn.Parameter(p0.clone())
        opt = getattr(lib, name)([w], **kw)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        out.append(w.detach())
    torch.testing.assert_close(out[0], out[1], rtol=1e-3, atol=1e-3 * float(p0.abs().max()))


def _nearest_ok(codes_lb, codes_bnb, value, absmax, qmap):
    """(entries where bnb picked a nearest code, of them the fraction lowbit agrees on); asserts
    lowbit's code is never farther than bnb's from the fp32 value."""
    scale = absmax.repeat_interleave(256)[: value.numel()]
    d_lb = (qmap[codes_lb.long()] * scale - value).abs()
    d_bnb = (qmap[codes_bnb.long()] * scale - value).abs()
    slack = 1e-6 * value.abs() + 1e-30
    assert bool((d_lb <= d_bnb + slack).all()), "lowbit picked a code farther than bitsandbytes'"
    bnb_nearest = d_bnb <= d_lb + slack
    agree = (codes_lb == codes_bnb)[bnb_nearest].float().mean().item()
    return int(bnb_nearest.sum()), agree


@pytest.mark.parametrize("kind", ["adam", "lion", "momentum", "rmsprop"])
def test_8bit_steps_agree(kind):
    grads = _grads(50, N, seed=1)
    two = kind == "adam"
    beta2 = 0.999 if two else 0.99
    nb = -(-N // 256)
    state = [
        torch.randn(N) * 0.05,
        torch.zeros(N, dtype=torch.uint8),
        torch.zeros(N, dtype=torch.uint8),
    ]
    state += [torch.zeros(nb), torch.zeros(nb)]
    if kind == "rmsprop":  # its state is a mean square: start from the code of 0 in the signed map
        state[1].fill_(int(Q1.abs().argmin()))
    for step, g in enumerate(grads, start=1):
        A = [t.clone() for t in state]
        B = [t.clone() for t in state]
        bnb_F.optimizer_update_8bit_blockwise(
            kind, g, A[0], A[1], A[2] if two else None, 0.9, beta2, 0.0, 0.0, 1e-8, step, 1e-3,
            Q1, Q2 if two else None, A[3], A[4] if two else None, 0.01,
        )  # fmt: skip
        ops.optimizer_update_8bit_blockwise(
            kind, [g], [B[0]], [B[1]], [B[2]] if two else [], [B[3]], [B[4]] if two else [],
            Q1, Q2 if two else None, 0.9, beta2, 1e-8, step, 1e-3, 0.01,
        )  # fmt: skip
        torch.testing.assert_close(A[0], B[0], rtol=1e-3, atol=1e-3 * float(B[0].abs().max()))
        # The fp32 states before quantization (the kernel's, = the reference's).
        s = R.make_scalars(kind, 0.9, beta2, 1e-8, step, 1e-3, 0.01)
        m = R.reference.dequantize_blockwise(state[1], state[3], Q1, 256, torch.float32)
        v = (
            R.reference.dequantize_blockwise(state[2], state[4], Q2, 256, torch.float32)
            if two
            else None
        )
        _, m, v = R.update_fp32(s, g, state[0].clone(), m, v)
        count, agree = _nearest_ok(B[1], A[1], m, B[3], Q1)
        assert count > 0.9 * N and agree >= 0.999, (step, count, agree)
        if two:
            _, agree2 = _nearest_ok(B[2], A[2], v, B[4], Q2)
            assert agree2 >= 0.999, (step, agree2)
        state = B


def _train(opt, model, steps, seed):
    torch.manual_seed(seed)
    x = torch.randn(64, 32)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 300), torch.nn.Tanh(), torch.nn.Linear(300, 16))


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit", "SGD8bit", "AdamW32bit"])
def test_checkpoints_move_both_ways(name):
    kw = dict(lr=1e-3, min_8bit_size=1024) | (dict(momentum=0.9) if name == "SGD8bit" else {})
    # bitsandbytes -> lowbit
    m_b = _model()
    o_b = getattr(bnb.optim, name)(m_b.parameters(), **kw)
    _train(o_b, m_b, 3, 1)
    sd_b = o_b.state_dict()
    m_l = copy.deepcopy(m_b)
    o_l = getattr(O, name)(m_l.parameters(), **kw)
    o_l.load_state_dict(sd_b)
    for p_b, p_l in zip(m_b.parameters(), m_l.parameters()):
        s_b, s_l = o_b.state[p_b], o_l.state[p_l]
        assert s_l["step"] == s_b["step"] == 3
        for k in ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"):
            assert (k in s_b) == (k in s_l)
            if k in s_b:
                assert torch.equal(s_b[k], s_l[k])
    _train(o_l, m_l, 2, 2)  # lowbit continues from bitsandbytes' state
    # lowbit -> bitsandbytes
    sd_l = o_l.state_dict()
    m_b2 = copy.deepcopy(m_l)
    o_b2 = getattr(bnb.optim, name)(m_b2.parameters(), **kw)
    o_b2.load_state_dict(sd_l)
    for p_l, p_b in zip(m_l.parameters(), m_b2.parameters()):
        s_l, s_b = o_l.state[p_l], o_b2.state[p_b]
        assert s_b["step"] == 5
        assert torch.equal(s_b["state1"], s_l["state1"])
    _train(o_b2, m_b2, 2, 3)  # and bitsandbytes continues from lowbit's
    assert all(torch.isfinite(p).all() for p in m_b2.parameters())
