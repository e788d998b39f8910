"""CUDA optimizer kernels against the CPU kernels on the same inputs: the CUDA update performs the
same fp32 operations (explicitly rounded, never contracted into FMAs), so parameters, codes and
absmax must be bit-identical to the CPU ones (tolerance 0), and so to the pure-torch reference
(lowbit.optim.reference, run on CPU: torch's CUDA division by a scalar multiplies by the reciprocal,
so the reference is only exact on CPU). Multi-tensor launches: many small parameters of mixed dtypes
in one op call, and more than one launch's worth (kOptimMaxTensors = 32) of one dtype pair."""

import warnings

import pytest
import torch

import lowbit.optim as O
from lowbit._codes import create_dynamic_map
from lowbit.optim import reference as R

ops = torch.ops.lowbit

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; runs on the lent GPU machine"
)

KINDS = ["adam", "momentum", "rmsprop", "lion"]
DEV = "cuda"  # the device under test; CPU is the oracle
Q1 = create_dynamic_map(signed=True)
Q2 = create_dynamic_map(signed=False)


@pytest.fixture(params=["warp", "block"])
def kernel8(request, monkeypatch):
    """The two CUDA 8-bit kernels (optim.cu: one warp or one thread block per quantization block),
    held to the same bits; the op reads LOWBIT_OPTIM8_KERNEL at every call."""
    monkeypatch.setenv("LOWBIT_OPTIM8_KERNEL", request.param)
    return request.param


def _bits(t):
    t = t.detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


def _params(n_tensors, gen):
    sizes = [1, 255, 256, 257, 4096 * 3 + 5] + [
        int(s) for s in torch.randint(1, 3000, (n_tensors,), generator=gen)
    ]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    ps = [torch.randn(n, generator=gen).to(dtypes[i % 3]) for i, n in enumerate(sizes)]
    gs = [
        (torch.randn(n, generator=gen) * 0.1).to(dtypes[(i // 3) % 3]) for i, n in enumerate(sizes)
    ]
    return ps, gs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sr", [-1, 1234])
def test_8bit_multi_tensor_matches_cpu(kind, sr, kernel8):
    gen = torch.Generator().manual_seed(0)
    ps, gs = _params(40, gen)
    gs[3].view(-1)[0] = float("nan")  # one parameter skipped
    two = kind == "adam"
    st = {}
    for dev in ("cpu", "cuda"):
        p = [t.clone().to(dev) for t in ps]
        g = [t.clone().to(dev) for t in gs]
        s1 = [torch.zeros(t.numel(), dtype=torch.uint8, device=dev) for t in ps]
        s2 = [torch.zeros(t.numel(), dtype=torch.uint8, device=dev) for t in ps] if two else []
        a1 = [torch.zeros(-(-t.numel() // 256), device=dev) for t in ps]
        a2 = [torch.zeros(-(-t.numel() // 256), device=dev) for t in ps] if two else []
        flags = []
        for step in (1, 2, 3):
            flags.append(
                ops.optimizer_update_8bit_blockwise(
                    kind,
                    g,
                    p,
                    s1,
                    s2,
                    a1,
                    a2,
                    Q1.to(dev),
                    Q2.to(dev) if two else None,
                    0.9,
                    0.99,
                    1e-8,
                    step,
                    1e-2,
                    0.01,
                    1.0,
                    False,
                    sr,
                ).cpu()
            )
        st[dev] = (p, s1, s2, a1, a2, flags)
    for xs, ys in zip(st["cpu"][:5], st["cuda"][:5]):
        for x, y in zip(xs, ys):
            assert torch.equal(_bits(x), _bits(y))
    for x, y in zip(st["cpu"][5], st["cuda"][5]):
        assert torch.equal(x, y)
    assert not bool(st["cuda"][5][0][3])


@pytest.mark.parametrize("kind", KINDS)
def test_32bit_multi_tensor_matches_cpu(kind):
    gen = torch.Generator().manual_seed(1)
    ps, gs = _params(40, gen)
    two = kind == "adam"
    out = {}
    for dev in ("cpu", "cuda"):
        p = [t.clone().to(dev) for t in ps]
        g = [t.clone().to(dev) for t in gs]
        s1 = [torch.zeros(t.numel(), device=dev) for t in ps]
        s2 = [torch.zeros(t.numel(), device=dev) for t in ps] if two else []
        for step in (1, 2):
            ops.optimizer_update_32bit(kind, g, p, s1, s2, 0.9, 0.99, 1e-8, step, 1e-2, 0.01)
        out[dev] = (p, s1, s2)
    for xs, ys in zip(out["cpu"], out["cuda"]):
        for x, y in zip(xs, ys):
            assert torch.equal(_bits(x), _bits(y))


def test_optimizer_on_cuda_matches_cpu():
    torch.manual_seed(0)
    models = {
        d: torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 8))
        for d in ("cpu",)
    }
    models["cuda"] = __import__("copy").deepcopy(models["cpu"]).cuda()
    opts = {d: O.AdamW8bit(m.parameters(), lr=1e-2, min_8bit_size=1024) for d, m in models.items()}
    x = torch.randn(32, 64)
    for _ in range(5):
        for d, m in models.items():
            opts[d].zero_grad()
            m(x.to(d)).square().mean().backward()
        # identical gradients on both devices, so the updates can be compared bit for bit
        for pc, pg in zip(models["cpu"].parameters(), models["cuda"].parameters()):
            pg.grad.copy_(pc.grad)
        for o in opts.values():
            o.step()
    for pc, pg in zip(models["cpu"].parameters(), models["cuda"].parameters()):
        assert torch.equal(_bits(pc), _bits(pg))
        sc, sg = opts["cpu"].state[pc], opts["cuda"].state[pg]
        assert torch.equal(sc["state1"], sg["state1"].cpu())


# ---- more cases: every optimizer / dtype / hyper-parameter path, launch splits, special maps ----


def _state8(numels, dev, two):
    s1 = [torch.zeros(n, dtype=torch.uint8, device=dev) for n in numels]
    s2 = [torch.zeros(n, dtype=torch.uint8, device=dev) for n in numels] if two else []
    a1 = [torch.zeros(-(-n // 256), device=dev) for n in numels]
    a2 = [torch.zeros(-(-n // 256), device=dev) for n in numels] if two else []
    return s1, s2, a1, a2


def _run8(fn, kind, g, p, st, q1, q2, step, **kw):
    s1, s2, a1, a2 = st
    hyper = dict(beta1=0.9, beta2=0.99, eps=1e-8, lr=1e-2)
    hyper.update(kw)
    return fn(kind, g, p, s1, s2, a1, a2, q1, q2, step=step, **hyper)


def _assert_same(xs, ys):
    for x, y in zip(xs, ys):
        assert x.shape == y.shape
        assert torch.equal(_bits(x), _bits(y))


# (step, weight_decay, gnorm_scale, skip_zeros): every branch of optim_update_element
VARIANTS = [(1, 0.0, 1.0, False), (2, 0.05, 0.5, False), (3, 0.0, 1.0, True), (4, 0.1, 2.0, True)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "pdtype,gdtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=str,
)
def test_8bit_variants_match_cpu_and_reference(kind, pdtype, gdtype, kernel8):
    """Odd sizes (partial last blocks), weight decay, gradient scaling, skip_zeros, steps 1..4, and
    stochastic rounding for bf16 parameters: the device against the CPU kernel and against the
    reference (codes and absmax bit-exact; parameters bit-exact too, stated tolerance 0)."""
    gen = torch.Generator().manual_seed(7)
    sizes = [1, 255, 257, 1000, 256 * 9 + 31]
    two = kind == "adam"
    sr = 77 if pdtype == torch.bfloat16 else -1
    p0 = [torch.randn(n, generator=gen).to(pdtype) for n in sizes]
    grads = []
    for v, (_, _, _, skip) in enumerate(VARIANTS):
        gs = [(torch.randn(n, generator=gen) * 0.1).to(gdtype) for n in sizes]
        if skip:
            for t in gs:
                t[:: 3 + v] = 0
        grads.append(gs)
    runs = {}
    for name, fn, dev in (
        ("cpu", ops.optimizer_update_8bit_blockwise, "cpu"),
        ("ref", R.optimizer_update_8bit_blockwise, "cpu"),
        ("dev", ops.optimizer_update_8bit_blockwise, DEV),
    ):
        p = [t.clone().to(dev) for t in p0]
        st = _state8(sizes, dev, two)
        q1, q2 = Q1.to(dev), (Q2.to(dev) if two else None)
        for (step, wd, gn, skip), gs in zip(VARIANTS, grads):
            g = [t.to(dev) for t in gs]
            applied = _run8(
                fn,
                kind,
                g,
                p,
                st,
                q1,
                q2,
                step,
                weight_decay=wd,
                gnorm_scale=gn,
                skip_zeros=skip,
                sr_seed=sr + step if sr >= 0 else -1,
            )
            assert applied.tolist() == [True] * len(sizes)
        runs[name] = (p, *st)
    for other in ("ref", "dev"):
        for xs, ys in zip(runs["cpu"], runs[other]):
            _assert_same(xs, ys)


@pytest.mark.parametrize("kind", KINDS)
def test_32bit_variants_match_cpu_and_reference(kind):
    gen = torch.Generator().manual_seed(8)
    sizes = [1, 3, 1023, 1025, 4096 + 5]
    dts = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    two = kind == "adam"
    p0 = [torch.randn(n, generator=gen).to(dt) for n, dt in zip(sizes, dts)]
    grads = [[(torch.randn(n, generator=gen) * 0.1) for n in sizes] for _ in VARIANTS]
    for v, gs in enumerate(grads):
        if VARIANTS[v][3]:
            for t in gs:
                t[:: 2 + v] = 0
    runs = {}
    for name, fn, dev in (
        ("cpu", ops.optimizer_update_32bit, "cpu"),
        ("ref", R.optimizer_update_32bit, "cpu"),
        ("dev", ops.optimizer_update_32bit, DEV),
    ):
        p = [t.clone().to(dev) for t in p0]
        s1 = [torch.zeros(n, device=dev) for n in sizes]
        s2 = [torch.zeros(n, device=dev) for n in sizes] if two else []
        for (step, wd, gn, skip), gs in zip(VARIANTS, grads):
            fn(
                kind,
                [t.to(dev) for t in gs],
                p,
                s1,
                s2,
                0.9,
                0.99,
                1e-8,
                step,
                1e-2,
                weight_decay=wd,
                gnorm_scale=gn,
                skip_zeros=skip,
                sr_seed=5 + step,
            )
        runs[name] = (p, s1, s2)
    for other in ("ref", "dev"):
        for xs, ys in zip(runs["cpu"], runs[other]):
            _assert_same(xs, ys)


@pytest.mark.parametrize("eight", [True, False], ids=["8bit", "32bit"])
def test_many_tensors_split_into_launches(eight, kernel8):
    """100 small tensors of ONE dtype pair (so one group, split into 4 launches of <= 32), an empty
    one among them, NaN/Inf gradients in the first, a middle and the last launch: the flags reach
    the right tensors across launches and dtype groups, and the rest match the CPU bit for bit."""
    gen = torch.Generator().manual_seed(9)
    sizes = [int(s) for s in torch.randint(1, 700, (100,), generator=gen)]
    sizes[40] = 0
    sizes += [513, 5]  # two tensors of another dtype pair, interleaved in the list
    dts = [torch.float32] * 100 + [torch.bfloat16, torch.bfloat16]
    order = list(range(100))
    order.insert(10, 100)
    order.insert(70, 101)
    sizes, dts = [sizes[i] for i in order], [dts[i] for i in order]
    p0 = [torch.randn(n, generator=gen).to(dt) for n, dt in zip(sizes, dts)]
    g0 = [(torch.randn(n, generator=gen) * 0.1).to(dt) for n, dt in zip(sizes, dts)]
    bad = {
        3: float("nan"),
        10: float("inf"),
        45: float("-inf"),
        70: float("nan"),
        101: float("inf"),
    }
    for i, v in bad.items():
        g0[i][-1] = v
    out = {}
    for key, dev in (("cpu", "cpu"), ("dev", DEV)):
        p = [t.clone().to(dev) for t in p0]
        g = [t.to(dev) for t in g0]
        flags = []
        if eight:
            st = _state8(sizes, dev, True)
            for step in (1, 2):
                flags.append(
                    _run8(
                        ops.optimizer_update_8bit_blockwise,
                        "adam",
                        g,
                        p,
                        st,
                        Q1.to(dev),
                        Q2.to(dev),
                        step,
                    ).cpu()
                )
        else:
            st = ([torch.zeros(n, device=dev) for n in sizes], [])
            for step in (1, 2):
                flags.append(
                    ops.optimizer_update_32bit(
                        "lion", g, p, st[0], [], 0.9, 0.99, 1e-8, step, 1e-2
                    ).cpu()
                )
        out[key] = (p, *st, flags)
    for xs, ys in zip(out["cpu"][:-1], out["dev"][:-1]):
        _assert_same(xs, ys)
    expect = [i not in bad for i in range(len(sizes))]
    for f_cpu, f_dev in zip(out["cpu"][-1], out["dev"][-1]):
        assert f_cpu.tolist() == expect and f_dev.tolist() == expect
    for i in bad:  # untouched
        assert torch.equal(_bits(out["dev"][0][i]), _bits(p0[i]))


_LARGE_CPU = {}  # the CPU oracle of test_large_tensor_grid_stride, computed once for both kernels


def _large_run(n, dev, seed=10):
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, generator=gen)
    g0 = torch.randn(n, generator=gen) * 0.1
    p, g = [p0.to(dev)], [g0.to(dev)]
    st = _state8([n], dev, True)
    for step in (1, 2):
        _run8(ops.optimizer_update_8bit_blockwise, "adam", g, p, st, Q1.to(dev), Q2.to(dev), step)
    return (p, *st)


def test_large_tensor_grid_stride(kernel8):
    """More quantization blocks than the block kernel's grid (2^16 thread blocks, one block of 256
    values each): its grid-stride loop, against the CPU."""
    n = (1 << 16) * 256 * 2 + 333
    if n not in _LARGE_CPU:
        _LARGE_CPU[n] = _large_run(n, "cpu")
    for xs, ys in zip(_LARGE_CPU[n], _large_run(n, DEV)):
        _assert_same(xs, ys)


def test_warp_kernel_grid_stride_matches_block_kernel(monkeypatch):
    """The warp kernel's grid covers 2^16 * 8 quantization blocks per pass: a tensor with more
    (151M values) takes its grid-stride loop; the block kernel (held to the CPU above) is the
    oracle, on the device."""
    n = (1 << 16) * 8 * 256 + (1 << 16) * 256 + 333
    out = {}
    for kernel in ("block", "warp"):
        monkeypatch.setenv("LOWBIT_OPTIM8_KERNEL", kernel)
        out[kernel] = _large_run(n, DEV, seed=13)
    for xs, ys in zip(out["block"], out["warp"]):
        for x, y in zip(xs, ys):
            assert torch.equal(x, y)


def test_maps_quantization_rule_derived_on_device(kernel8):
    """The kernel derives midpoints and the zero code from the map itself: a map without an exact
    0 whose smallest |c| is a tie (the first index wins, as on CPU), used on all-zero blocks (zero
    code) and ordinary ones, for both states."""
    q = torch.linspace(-1, 1, 256)  # |q[127]| == |q[128]|: tie, index 127 wins
    qu = torch.linspace(0.001, 1, 256) ** 2  # unsigned, no 0 at all: zero code 0
    n = 256 * 3 + 7
    gen = torch.Generator().manual_seed(11)
    p0 = torch.randn(n, generator=gen)
    g0 = torch.randn(n, generator=gen) * 0.1
    g0[256:512] = 0  # an all-zero block: m = v = 0 at step 1, absmax 0, every code the zero code
    out = {}
    for key, dev in (("cpu", "cpu"), ("dev", DEV)):
        p, g = [p0.clone().to(dev)], [g0.to(dev)]
        st = _state8([n], dev, True)
        _run8(ops.optimizer_update_8bit_blockwise, "adam", g, p, st, q.to(dev), qu.to(dev), 1)
        out[key] = (p, *st)
    for xs, ys in zip(out["cpu"], out["dev"]):
        _assert_same(xs, ys)
    assert bool((out["dev"][1][0][256:512] == 127).all())
    assert bool((out["dev"][2][0][256:512] == 0).all())


OPTIMIZERS = [
    (O.Adam8bit, {}),
    (O.AdamW8bit, {"weight_decay": 0.1}),
    (O.Lion8bit, {"lr": 1e-3}),
    (O.SGD8bit, {"lr": 1e-2, "momentum": 0.9}),
    (O.RMSprop8bit, {"lr": 1e-3}),
    (O.AdamW32bit, {}),
    (O.Lion32bit, {"lr": 1e-3}),
    (O.SGD32bit, {"lr": 1e-2, "momentum": 0.9}),
    (O.RMSprop32bit, {"lr": 1e-3}),
]


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_optimizer_on_device_matches_cpu(cls, kw, dtype):
    """The optimizer classes (one op call per step over all parameters: a multi-tensor launch) on
    the device and on CPU, same gradients: parameters and states bit-identical; bf16 parameters
    with stochastic rounding."""
    torch.manual_seed(0)
    shapes = [(300, 70), (70,), (513,), (4096 + 3,), (17, 3)]
    base = [torch.randn(s).to(dtype) for s in shapes]
    sr = dtype == torch.bfloat16
    params, opts = {}, {}
    for key, dev in (("cpu", "cpu"), ("dev", DEV)):
        params[key] = [torch.nn.Parameter(t.clone().to(dev)) for t in base]
        opts[key] = cls(params[key], min_8bit_size=256, stochastic_rounding=sr, **kw)
        # one seed stream for both, so stochastic rounding draws the same bits
        opts[key]._sr_base = 12345 if sr else -1
    for _ in range(3):
        grads = [(torch.randn(s) * 0.1).to(dtype) for s in shapes]
        for key, dev in (("cpu", "cpu"), ("dev", DEV)):
            for p, gr in zip(params[key], grads):
                p.grad = gr.to(dev)
            opts[key].step()
    for pc, pd in zip(params["cpu"], params["dev"]):
        assert torch.equal(_bits(pc), _bits(pd))
        sc, sd = opts["cpu"].state[pc], opts["dev"].state[pd]
        assert sc["step"] == sd["step"] == 3
        for name in ("state1", "state2", "absmax1", "absmax2"):
            if name in sc:
                assert torch.equal(_bits(sc[name]), _bits(sd[name])), name


def test_nonfinite_gradient_on_device_warns_at_next_sync_point():
    """On CUDA, step() does not wait for the non-finite check; the warning and the step count
    correction come at the next step() or state_dict(), before any further update."""
    w = torch.nn.Parameter(torch.randn(4096, device=DEV))
    v = torch.nn.Parameter(torch.randn(4096, device=DEV))
    opt = O.AdamW8bit([w, v], min_8bit_size=256)
    w.grad = torch.randn(4096, device=DEV)
    v.grad = torch.randn(4096, device=DEV)
    opt.step()
    w0 = w.detach().clone()
    s0 = opt.state[w]["state1"].clone()
    w.grad[5] = float("nan")
    opt.step()
    with pytest.warns(RuntimeWarning, match="parameter 0 of param_groups"):
        sd = opt.state_dict()
    assert opt.state[w]["step"] == 1 and opt.state[v]["step"] == 2
    assert sd["state"][0]["step"] == 1
    assert torch.equal(w.detach(), w0) and torch.equal(opt.state[w]["state1"], s0)
    w.grad[5] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # nothing pending: no warning
    assert opt.state[w]["step"] == 2


def test_op_captured_in_cuda_graph(kernel8):
    """No host synchronisation and no host-to-device copy in the op: it can be captured in a CUDA
    graph, and replays give the eager results."""
    gen = torch.Generator().manual_seed(12)
    sizes = [1000, 4096 + 1, 77]
    p0 = [torch.randn(n, generator=gen) for n in sizes]
    gs = [[torch.randn(n, generator=gen) * 0.1 for n in sizes] for _ in range(3)]
    q1, q2 = Q1.to(DEV), Q2.to(DEV)
    # eager
    p = [t.clone().to(DEV) for t in p0]
    st = _state8(sizes, DEV, True)
    for k in range(3):
        _run8(
            ops.optimizer_update_8bit_blockwise,
            "adam",
            [t.to(DEV) for t in gs[k]],
            p,
            st,
            q1,
            q2,
            1,
        )
    eager = (p, *st)
    # graph: static gradient buffers, one capture, three replays
    p = [t.clone().to(DEV) for t in p0]
    st = _state8(sizes, DEV, True)
    g = [torch.zeros(n, device=DEV) for n in sizes]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, on copies
        pw, stw = [t.clone() for t in p], tuple([t.clone() for t in x] for x in st)
        _run8(ops.optimizer_update_8bit_blockwise, "adam", g, pw, stw, q1, q2, 1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        applied = _run8(ops.optimizer_update_8bit_blockwise, "adam", g, p, st, q1, q2, 1)
    for k in range(3):
        for dst, src in zip(g, gs[k]):
            dst.copy_(src)
        graph.replay()
    torch.cuda.synchronize()
    assert applied.cpu().tolist() == [True] * len(sizes)
    for xs, ys in zip(eager, (p, *st)):
        _assert_same(xs, ys)


def _nan_bit_patterns(t):
    """The distinct bit patterns of the NaN elements of t."""
    t = t.detach().cpu()
    return set(_bits(t)[t.float().isnan()].tolist())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nan_parameters_and_states_get_the_cpu_nan_bits(kind, dtype, kernel8):
    """NaN parameters and states with finite gradients: a block whose absmax is NaN (its state
    overflowed at an earlier step), a NaN parameter, and 0/0 with eps = 0 (zero gradient and zero
    states). A CUDA operation returns the canonical NaN 0x7fffffff; the CPU kernels (and the
    reference) keep the quieted NaN operand or make the default NaN 0xffc00000, so without
    optim.cu's update_element the device stored other NaN bits than the CPU (8-bit parameters,
    32-bit parameters and states)."""
    gen = torch.Generator().manual_seed(14)
    two = kind == "adam"
    n = 1300
    p0 = torch.randn(n, generator=gen).to(dtype)
    g0 = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    p0[1100] = float("nan")
    g0[700] = 0.0
    q1_0 = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    q2_0 = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    q1_0[700] = int(Q1.abs().argmin())  # decodes to 0
    q2_0[700] = int(Q2.abs().argmin())
    a1_0, a2_0 = torch.rand(6, generator=gen), torch.rand(6, generator=gen)
    a1_0[1] = float("nan")
    a2_0[3] = float("nan")
    f1_0, f2_0 = torch.randn(n, generator=gen), torch.rand(n, generator=gen)
    f1_0[5] = float("nan")
    f1_0[700] = f2_0[700] = 0.0
    out = {}
    for key, dev in (("cpu", "cpu"), ("dev", DEV)):
        p8, p32 = [p0.clone().to(dev)], [p0.clone().to(dev)]
        g = [g0.to(dev)]
        st = (
            [q1_0.clone().to(dev)],
            [q2_0.clone().to(dev)] if two else [],
            [a1_0.clone().to(dev)],
            [a2_0.clone().to(dev)] if two else [],
        )
        q2 = Q2.to(dev) if two else None
        _run8(ops.optimizer_update_8bit_blockwise, kind, g, p8, st, Q1.to(dev), q2, 3, eps=0.0)
        f1, f2 = [f1_0.clone().to(dev)], ([f2_0.clone().to(dev)] if two else [])
        ops.optimizer_update_32bit(kind, g, p32, f1, f2, 0.9, 0.99, 0.0, 3, 1e-2)
        out[key] = (p8, *st, p32, f1, f2)
    assert _nan_bit_patterns(out["cpu"][0][0])  # the case is exercised: NaN parameters
    for xs, ys in zip(out["cpu"], out["dev"]):
        _assert_same(xs, ys)
