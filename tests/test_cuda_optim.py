"""CUDA optimizer kernels against the CPU kernels on the same inputs: the CUDA update performs the
same fp32 operations (explicitly rounded, never contracted into FMAs), so parameters, codes and
absmax must be bit-identical to the CPU ones (tolerance 0). Multi-tensor launches: many small
parameters of mixed dtypes in one op call, more than one launch's worth (32) of them."""

import pytest
import torch

import lowbit.optim as O
from lowbit._codes import create_dynamic_map

ops = torch.ops.lowbit

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; runs on the lent GPU machine"
)

KINDS = ["adam", "momentum", "rmsprop", "lion"]
Q1 = create_dynamic_map(signed=True)
Q2 = create_dynamic_map(signed=False)


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
def test_8bit_multi_tensor_matches_cpu(kind, sr):
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
