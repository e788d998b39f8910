"""Run: python tools/affine_gemv_cancel.py. Worst case for the factored chunk sum s * (sum x*q - z * sum x) in fp32 against the exact
(q - z) * s products in fp64: codes and zeros near 255 (|q - z| small, so sum x*q and z * sum x
cancel), activations of one sign (no cancellation in the true sum to hide behind)."""

import numpy as np

rng = np.random.default_rng(0)
N, K, gs = 256, 4096, 128
for name, q, z, x in [
    (
        "random codes, zeros ~128",
        rng.integers(0, 256, (N, K)),
        rng.uniform(0, 255, (N, K // gs)),
        rng.standard_normal(K),
    ),
    (
        "codes 250..255, zeros 252.5, x > 0",
        rng.integers(250, 256, (N, K)),
        np.full((N, K // gs), 252.5),
        rng.uniform(0, 1, K),
    ),
    (
        "codes 0..255, zeros 255, x > 0",
        rng.integers(0, 256, (N, K)),
        np.full((N, K // gs), 255.0),
        rng.uniform(0, 1, K),
    ),
]:
    s = rng.uniform(1e-3, 0.1, (N, K // gs)).astype(np.float32)
    z = z.astype(np.float32)
    q = q.astype(np.float32)
    x = x.astype(np.float32)
    W = (q.reshape(N, -1, gs) - z[..., None]).astype(np.float32) * s[
        ..., None
    ]  # the CPU decode, fp32
    exact = W.reshape(N, K).astype(np.float64) @ x.astype(np.float64)
    xc = x.reshape(-1, 16)
    qc = q.reshape(N, -1, 16)
    part = np.einsum(
        "nci,ci->nc", qc, xc, dtype=np.float32
    )  # fp32 (order differs from the GPU; same magnitude)
    xs = xc.sum(1, dtype=np.float32)
    zc = np.repeat(z, gs // 16, axis=1)
    sc = np.repeat(s, gs // 16, axis=1)
    acc = (sc * (part - zc * xs)).astype(np.float32).sum(1, dtype=np.float32)
    rel = np.linalg.norm(acc - exact) / np.linalg.norm(exact)
    worst = np.max(
        np.abs(acc - exact) / (np.abs(W.reshape(N, K)).astype(np.float64) @ np.abs(x) / np.sqrt(K))
    )
    d = (
        (qc - zc.repeat(1, axis=1)[..., None]) if False else (qc - zc[..., None]).astype(np.float32)
    )  # q - z, fp32
    part2 = np.einsum("nci,ci->nc", d, xc, dtype=np.float32)
    acc2 = (sc * part2).astype(np.float32).sum(1, dtype=np.float32)
    rel2 = np.linalg.norm(acc2 - exact) / np.linalg.norm(exact)
    print(f"  s * sum x * (q - z) (the kernel): relative Frobenius error {rel2:.2e}")
    print(
        f"{name}: s * (sum x q - z sum x): relative Frobenius error {rel:.2e} (fp32 test tolerance 1e-5); worst element / its scale {worst:.2e} (ELEM_TOL 1e-4)"
    )
