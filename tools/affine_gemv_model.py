"""Run: python tools/affine_gemv_model.py (CPU, a few minutes).

Numpy model of gemv_affine_kernel's index math (affine.cu): which lane reads which bytes, the
vector/piece/chunk decode (PRMT / nibble shifts), FastDiv32 groups, the mixed-chunk test, split-K
and the column tails. Compared against lowbit.reference.decode_affine @ A in float64."""

import sys

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "python"))
from lowbit import reference as R


def fastdiv(d):
    sh = 0
    while (1 << sh) < d:
        sh += 1
    mul = ((1 << 32) * ((1 << sh) - d)) // d + 1
    assert mul < (1 << 32)
    return lambda n: (((n * mul) >> 32) + n) >> sh


def prmt(x, y, s):  # __byte_perm(x, y, s), selector nibbles 0-7 pick from x bytes 0-3, y bytes 4-7
    pool = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    return sum(pool[(s >> (4 * n)) & 7] << (8 * n) for n in range(4))


def f32bits(u):
    return np.array([u], dtype=np.uint32).view(np.float32)[0]


def code_of(words, bits, p, i):
    if bits == 8:
        w = words[2 * p + (i >> 2)]
        u = prmt(w, 0x4B000000, 0x7440 | (i & 3))
    else:
        w = words[p]
        sh = 8 * (i >> 1) + (0 if i & 1 else 4)
        u = 0x4B000000 | ((w >> sh) & 15)
    return np.float32(f32bits(u) - np.float32(8388608.0))


def affine_code(packed, bits, e):
    if bits == 8:
        return int(packed[e])
    return (int(packed[e >> 1]) >> ((~e & 1) << 2)) & 0xF


def model(A, packed, scales, zeros, bits, gs, N, K, KSPLIT, vec):
    M = A.shape[0]
    VE = 128 // bits
    nvec = -(-K // VE)
    U = 2 if M <= 2 else 1
    COLS = 2
    div = fastdiv(gs)
    gpr = K // gs
    gs16 = gs % 16 == 0
    packed = packed.numpy()
    scales = scales.numpy()
    zeros = zeros.numpy()
    A = A.numpy().astype(np.float32)
    out = np.zeros((M, N), np.float64)
    touched = np.zeros(N * K, int)
    for j0 in range(0, N, COLS):
        red = np.zeros((KSPLIT, COLS, M), np.float32)
        for ks in range(KSPLIT):
            for lane in range(32):
                acc = np.zeros((COLS, M), np.float32)
                v0 = ks * 32 + lane
                while v0 < nvec:
                    wv = {}
                    for u in range(U):
                        v = v0 + u * 32 * KSPLIT
                        for c in range(COLS):
                            j = j0 + c
                            words = [0, 0, 0, 0]
                            if v < nvec and j < N:
                                if vec:
                                    base = j * (K * bits // 8) + v * 16
                                    assert base % 16 == 0
                                    byts = packed[base : base + 16]
                                    for b in range(16):
                                        words[b >> 2] |= int(byts[b]) << (8 * (b & 3))
                                    for b in range(16):
                                        for t in (0,) if bits == 8 else (0, 1):
                                            touched[(base + b) * (8 // bits) + t] += 1
                                else:
                                    e0 = j * K + v * VE
                                    k0 = v * VE
                                    for b in range(16):
                                        if bits == 8:
                                            byte = (
                                                affine_code(packed, 8, e0 + b) if k0 + b < K else 0
                                            )
                                            if k0 + b < K:
                                                touched[e0 + b] += 1
                                        else:
                                            hi = (
                                                affine_code(packed, 4, e0 + 2 * b)
                                                if k0 + 2 * b < K
                                                else 0
                                            )
                                            lo = (
                                                affine_code(packed, 4, e0 + 2 * b + 1)
                                                if k0 + 2 * b + 1 < K
                                                else 0
                                            )
                                            for t in (0, 1):
                                                if k0 + 2 * b + t < K:
                                                    touched[e0 + 2 * b + t] += 1
                                            byte = (hi << 4) | lo
                                        words[b >> 2] |= byte << (8 * (b & 3))
                            wv[u, c] = words
                    for u in range(U):
                        v = v0 + u * 32 * KSPLIT
                        if v >= nvec:
                            break
                        for h in range(VE // 16):
                            kc = v * VE + 16 * h
                            if not vec and kc >= K:
                                break
                            nvalid = min(16, K - kc)
                            kq = div(kc)
                            assert kq == kc // gs
                            s = [0.0] * COLS
                            z = [0.0] * COLS
                            mixed = [False] * COLS
                            for c in range(COLS):
                                j = j0 + c
                                if j >= N:
                                    continue
                                mixed[c] = (not gs16) and (kc - kq * gs) + nvalid > gs
                                if mixed[c]:
                                    s[c] = 1.0
                                else:
                                    gi = j * gpr + kq
                                    assert all(
                                        (j * K + k) // gs == gi for k in range(kc, kc + nvalid)
                                    )
                                    s[c] = scales[gi]
                                    z[c] = zeros[gi]
                            part = np.zeros((COLS, M), np.float32)
                            xs = np.zeros(M, np.float32)
                            for p2 in range(2):
                                p = 2 * h + p2
                                kp = kc + 8 * p2
                                x = np.zeros((M, 8), np.float32)
                                for i in range(8):
                                    if kp + i < K:
                                        x[:, i] = A[:, kp + i]
                                if vec:
                                    assert kp + 8 <= K
                                xs += x.sum(1, dtype=np.float32)
                                for c in range(COLS):
                                    j = j0 + c
                                    w = np.array(
                                        [code_of(wv[u, c], bits, p, i) for i in range(8)],
                                        np.float32,
                                    )
                                    if j < N and all(kp + i < K for i in range(8)):
                                        ref = [
                                            affine_code(packed, bits, j * K + kp + i)
                                            for i in range(8)
                                        ]
                                        assert list(w.astype(int)) == ref, (w, ref)
                                    if not mixed[c]:
                                        w = (w - np.float32(z[c])).astype(np.float32)
                                    if mixed[c]:
                                        for i in range(8):
                                            if kp + i < K:
                                                gi = j * gpr + div(kp + i)
                                                assert gi == (j * K + kp + i) // gs
                                                w[i] = np.float32(
                                                    np.float32(w[i] - zeros[gi]) * scales[gi]
                                                )
                                            else:
                                                w[i] = 0
                                    part[c] += (x * w).sum(1, dtype=np.float32)
                            for c in range(COLS):
                                acc[c] += np.float32(s[c]) * part[c]
                    v0 += 32 * KSPLIT * U
                red[ks] += acc  # warp_sum
        for c in range(COLS):
            if j0 + c < N:
                out[:, j0 + c] = red[:, c, :].sum(0)
    return out, touched


rng = torch.Generator().manual_seed(0)
cases = [
    (8, 3, 1024, 128, 1, True),
    (8, 5, 576, 48, 2, True),
    (8, 3, 96, 96, 4, True),
    (8, 3, 70, 35, 1, False),
    (8, 4, 100, 20, 2, False),
    (8, 3, 64, 8, 1, True),
    (8, 2, 1040, 1040, 8, True),
    (4, 3, 960, 48, 2, True),
    (4, 3, 96, 96, 1, True),
    (4, 3, 100, 50, 1, False),
    (4, 3, 99, 33, 2, False),
    (4, 2, 64, 16, 1, True),
    (8, 7, 33, 11, 1, False),
    (4, 5, 7, 7, 1, False),
    (8, 3, 2048 + 16, 16, 2, True),
]
for bits, N, K, gs, ksplit, vec in cases:
    for M in (1, 3):
        packed, scales, zeros = R.quantize_affine(torch.randn(N, K, generator=rng), bits, gs, False)
        zeros = zeros + torch.rand(zeros.shape, generator=rng)  # fractional zeros (HQQ-like)
        A = torch.randn(M, K, generator=rng)
        if vec:
            assert K % (128 // bits) == 0
        got, touched = model(A, packed, scales, zeros, bits, gs, N, K, ksplit, vec)
        W = R.decode_affine(packed, scales, zeros, bits, gs, (N, K)).double()
        ref = A.double() @ W.T
        rel = float(np.linalg.norm(got - ref.numpy()) / np.linalg.norm(ref.numpy()))
        assert (touched == 1).all(), ("each code read once", bits, N, K, gs)
        assert rel < 1e-6, (bits, N, K, gs, ksplit, vec, M, rel)
        print(
            f"bits {bits} N {N} K {K} gs {gs} ks {ksplit} vec {vec} M {M}: rel {rel:.2e}, every code read once"
        )
# FastDiv32 over the kernel's range of k for many divisors
for d in list(range(1, 300)) + [4095, 4096, 11008, 14336, (1 << 31) - 1, 1 << 30]:
    f = fastdiv(d)
    ks_ = np.unique(
        np.concatenate(
            [
                np.arange(0, 5000),
                np.array([d - 1, d, d + 1, 2 * d - 1, (1 << 31) - 1, (1 << 31) - 17]),
            ]
        )
    )
    ks_ = ks_[(ks_ >= 0) & (ks_ < (1 << 31))]
    assert all(f(int(k)) == int(k) // d for k in ks_), d
print("FastDiv32 OK")
