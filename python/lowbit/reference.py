"""Pure-torch reference of every lowbit op: the executable spec.

Each function follows the kernel's order of operations (fp32 arithmetic, one rounding to the output
dtype), so quantized codes must match the kernels bit for bit and floats to within the tolerances
the tests state. Slow and memory-hungry on purpose: clarity over speed.

The per-block scale policy (csrc/include/lowbit/blockscale.h):
  * absmax = max |x| over the block, fp32; normalised x = x * fp32(1 / absmax);
  * an all-zero block stores absmax 0 and the code nearest 0 (dequantizes to exact zeros);
  * if 1 / absmax overflows (tiny subnormal absmax) the block divides instead;
  * a block holding NaN or +-Inf stores absmax NaN and the code nearest 0: it dequantizes to NaN.
The nearest-code rule (csrc/include/lowbit/codebook.h): code = order[bucketize(x, midpoints)], with
order the stable ascending argsort of the code table; exact ties go to the lower value.
"""

from __future__ import annotations

import math

import torch

from lowbit._codes import get_4bit_type

# fp32(1 / 127**2) and fp32(1 / 127) as the kernels compute them, kept as Python floats that are
# exactly representable in fp32 (so multiplying an fp32 tensor by them is the kernel's product).
INV_127_SQ = float(torch.tensor(1.0, dtype=torch.float32) / 16129.0)
INV_127 = float(torch.tensor(1.0, dtype=torch.float32) / 127.0)


# ---- shared block machinery -------------------------------------------------------------------


def _blocks(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """A flattened to fp32 and zero-padded to whole blocks: ([blocks, blocksize], n)."""
    a = A.reshape(-1).float()
    n = a.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32, device=A.device)
    padded[:n] = a
    return padded.view(blocks, blocksize), n


def _block_scales(blk: torch.Tensor):
    """(stored absmax, normalised values, special-block mask) for [blocks, bs] fp32 data."""
    finite = torch.isfinite(blk).all(dim=1)
    m = torch.where(torch.isfinite(blk), blk.abs(), torch.zeros_like(blk)).amax(dim=1)
    inv = 1.0 / m
    divide = torch.isinf(inv) & (m > 0)
    normed = torch.where(divide[:, None], blk / m[:, None], blk * inv[:, None])
    special = ~finite | (m == 0)  # blocks whose every code is the zero code
    stored = torch.where(finite, m, torch.full_like(m, float("nan")))
    return stored, normed, special


def _nearest_code(normed: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Code index per element: order[#midpoints < x] (codebook.h)."""
    values, order = torch.sort(code.float(), stable=True)
    bounds = (values[:-1] + values[1:]) / 2.0
    return order[torch.bucketize(normed, bounds.to(normed.device))]


def _zero_code(code: torch.Tensor) -> int:
    return int(torch.argmin(code.float().abs()))


def _quantize_codes(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    blk, n = _blocks(A, blocksize)
    absmax, normed, special = _block_scales(blk)
    q = _nearest_code(normed, code.to(A.device))
    q[special] = _zero_code(code)
    return q.reshape(-1)[:n], absmax


# ---- 8-bit blockwise --------------------------------------------------------------------------


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    q, absmax = _quantize_codes(A, code, blocksize)
    return q.to(torch.uint8).reshape(A.shape), absmax


def dequantize_blockwise(A, absmax, code, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    n = A.numel()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (code.float()[A.reshape(-1).long()] * scale).to(dtype).reshape(A.shape)


# ---- 4-bit ------------------------------------------------------------------------------------


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Element 2j in the HIGH nibble of byte j (codes holds an even count)."""
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    b = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n]


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    code = get_4bit_type(quant_type, device=A.device)
    q, absmax = _quantize_codes(A, code, blocksize)
    if q.numel() % 2:  # the odd tail pads with the code of 0.0
        q = torch.cat([q, torch.tensor([_zero_code(code)], device=q.device)])
    packed = pack_nibbles(q).to(torch.uint8)
    return packed.view(quant_storage).reshape(-1, 1), absmax


def decode_4bit(packed, absmax, code, blocksize: int, shape) -> torch.Tensor:
    """fp32 values of a packed 4-bit tensor over any 16-entry code."""
    n = math.prod(shape)
    nib = unpack_nibbles(packed, n)
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (code.float().to(packed.device)[nib] * scale).reshape(shape)


def dequantize_4bit(A, absmax, blocksize: int, quant_type: str, shape, dtype) -> torch.Tensor:
    code = get_4bit_type(quant_type, device=A.device)
    return decode_4bit(A, absmax, code, blocksize, tuple(shape)).to(dtype)


def decode_nested_absmax(
    absmax, nested_absmax, nested_code, nested_offset: float, nested_blocksize: int
) -> torch.Tensor:
    """The fp32 absmax of a double-quantized 4-bit tensor: per block,
    nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + nested_offset in fp32 (the
    product rounded first), i.e. dequantize_blockwise to fp32 followed by `+ offset`."""
    scale = dequantize_blockwise(
        absmax, nested_absmax, nested_code, nested_blocksize, torch.float32
    )
    return scale + torch.tensor(nested_offset, dtype=torch.float32, device=scale.device)


def gemv_4bit(
    A,
    B,
    shapeB,
    absmax,
    code,
    blocksize: int,
    nested_absmax=None,
    nested_code=None,
    nested_offset: float = 0.0,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    if nested_absmax is not None:
        absmax = decode_nested_absmax(
            absmax, nested_absmax, nested_code, nested_offset, nested_blocksize
        )
    W = decode_4bit(B, absmax, code, blocksize, tuple(shapeB))
    return (A.float() @ W.t()).to(A.dtype)


def quantize_activations_q8(A: torch.Tensor):
    """The int8 activations of the CPU fast path (cpu_kernels.h quantize_activations_q8), in
    element order: per 64-element chunk of each row, codes rne(x * (127 / amax)) and scale
    amax / 127 (codes and scale 0 for an all-zero chunk). A: fp32 [M, K], K % 64 == 0."""
    M, K = A.shape
    x = A.float().reshape(M, K // 64, 64)
    amax = x.abs().amax(dim=-1, keepdim=True)
    inv = torch.full_like(amax, 127.0) / amax  # true division, as the kernel
    codes = torch.where(amax > 0, torch.round(x * inv), torch.zeros_like(x))
    scale = torch.where(amax > 0, amax / 127.0, torch.zeros_like(amax))
    return codes.reshape(M, K), scale.reshape(M, K // 64)


def q8_weight_codes(code: torch.Tensor):
    """The 16 code values as the CPU fast path uses them (cpu_kernels.h make_q8_codebook):
    integers in [-64, 64] on a 64 / cmax grid (cmax = max |code|), rounded to nearest-even and
    then made unbiased (while the summed rounding error exceeds half a step, the code rounded
    farthest in that direction is rounded the other way, lowest index on ties), and the factor
    cmax / 64 that scales them back. None when the code has a NaN/Inf entry, is all zero, or is
    so small that 64 / cmax overflows: the CPU then keeps the exact kernel."""
    c = code.float().cpu().reshape(-1)
    cmax = c.abs().max()
    inv = torch.tensor(64.0) / cmax  # fp32, as the kernel
    if not (bool(torch.isfinite(c).all()) and float(cmax) > 0 and bool(torch.isfinite(inv))):
        return None
    v = c * inv  # fp32 products
    q = [int(x) for x in torch.round(v).tolist()]
    err = [q[i] - float(v[i]) for i in range(16)]
    total = 0.0
    for e in err:  # the kernel's summation order, in double
        total += e
    while abs(total) > 0.5:
        sign = 1 if total > 0 else -1
        pick = -1
        for i in range(16):
            if err[i] * sign > 0 and (pick < 0 or abs(err[i]) > abs(err[pick])):
                pick = i
        q[pick] -= sign
        err[pick] -= sign
        total -= sign
    return torch.tensor(q, dtype=torch.float32), cmax / 64.0


def _q8_activations_ok(A2: torch.Tensor) -> bool:
    """The activation side of the CPU dispatch: all finite, and every 64-element chunk's absmax
    either 0 or within [2^-100, 2^64] (outside, fp32 scales could lose or overflow the chunk)."""
    if not bool(torch.isfinite(A2).all()):
        return False
    amax = A2.float().reshape(A2.shape[0], -1, 64).abs().amax(-1)
    return bool(((amax == 0) | ((amax >= 2.0**-100) & (amax <= 2.0**64))).all())


def cpu_gemv_takes_int8(M: int, K: int, blocksize: int, A=None, code=None) -> bool:
    """Whether lowbit's CPU gemv_4bit runs the int8-activation kernel for M activation rows of
    length K: the dispatch rule of csrc/ops/cpu_gemm4.cpp, spelled out for tests and docs. With
    the activations A and the code given, their conditions are checked too (q8_weight_codes,
    finite and moderate activations). The kernel also hands a call whose result holds NaN/Inf to
    the exact kernel; gemv_4bit_expected mirrors that through the exact result."""
    from lowbit._native import cpu_gemv_mode

    pow2 = blocksize >= 32 and blocksize & (blocksize - 1) == 0
    if not (cpu_gemv_mode() == "int8" and 1 <= M <= 32 and K > 0 and K % 64 == 0 and pow2):
        return False
    if code is not None and q8_weight_codes(code) is None:
        return False
    return A is None or _q8_activations_ok(A.reshape(M, K))


def cpu_blas_takes_bf16(M: int, A) -> bool:
    """Whether lowbit's CPU 4-bit / affine product multiplies bf16 weight tiles (dequantized from
    the codes, rounded to bf16) by A with torch's BLAS: bf16 activations, M > 32 (past the int8
    tier, in the BLAS tier), on a CPU that multiplies bf16 natively (_native.cpu_matmul_dtype()).
    Each product is rounded to bf16 once (fp32 accumulation), as F.linear with a bf16 weight."""
    from lowbit._native import cpu_matmul_dtype

    return (
        A.device.type == "cpu"
        and A.dtype == torch.bfloat16
        and M > 32
        and (cpu_matmul_dtype() == "bf16")
    )


def _bf16_weight_product(A, W, bias=None):
    """A @ W^T with W rounded to bf16 and the product rounded to bf16 (the BLAS tier of
    cpu_blas_takes_bf16), then + bias in fp32, rounded to A's dtype."""
    out = (A.float() @ W.bfloat16().float().t()).bfloat16().float()
    if bias is not None:
        out = out + bias.float()
    return out.to(A.dtype)


def gemv_4bit_expected(A, B, shapeB, absmax, code, blocksize: int, *nested) -> torch.Tensor:
    """What lowbit's gemv_4bit op computes on A's device, as an executable spec: the int8-
    activation model (gemv_4bit_q8) where the CPU takes that kernel, bf16 weights where it takes
    the bf16 BLAS tier (cpu_blas_takes_bf16), the exact product (gemv_4bit) everywhere else. `nested`: gemv_4bit's double-quantization arguments. Valid for
    inputs whose fp32 products do not overflow (the kernel's NaN/Inf check is mirrored on the
    exact result)."""
    K = shapeB[1]
    M = A.numel() // K if K else 0
    if K and K % blocksize == 0 and cpu_blas_takes_bf16(M, A):
        if nested and nested[0] is not None:
            absmax = decode_nested_absmax(absmax, *nested)
        W = decode_4bit(B, absmax, code.to(B.device), blocksize, tuple(shapeB))
        return _bf16_weight_product(A.reshape(M, K), W).reshape(*A.shape[:-1], shapeB[0])
    exact = gemv_4bit(A, B, shapeB, absmax, code, blocksize, *nested)
    if A.device.type != "cpu" or not cpu_gemv_takes_int8(M, K, blocksize, A, code):
        return exact
    if not bool(torch.isfinite(exact).all()):
        return exact
    if nested and nested[0] is not None:
        absmax = decode_nested_absmax(absmax, *nested)
    return gemv_4bit_q8(A, B, shapeB, absmax, code, blocksize)


def gemv_4bit_q8(A, B, shapeB, absmax, code, blocksize: int) -> torch.Tensor:
    """What gemv_4bit computes on AVX2 CPUs for up to 32 activation rows when K % 64 == 0 and the
    block size is a power of two >= 32 (LOWBIT_CPU_GEMV=int8, the default): the code values
    rounded to integers on a 64 / max|code| grid (q8_weight_codes), the activations to int8 per
    64-element chunk (quantize_activations_q8), then the exact product of those, here in fp64.
    The kernel differs from this by fp32 rounding of the per-chunk scales and partial sums only.
    fp32/fp16/bf16 [..., K] finite activations and an fp32 absmax."""
    N, K = shapeB
    A2 = A.reshape(-1, K).float()
    w_int, w_scale = q8_weight_codes(code)
    nib = unpack_nibbles(B, N * K).reshape(N, K).long().cpu()
    scale = absmax.float().cpu().repeat_interleave(blocksize)[: N * K].reshape(N, K)
    W = w_int[nib].double() * scale.double()
    xq, xs = quantize_activations_q8(A2.cpu())
    X = xq.double() * xs.double().repeat_interleave(64, dim=1)
    out = (X @ W.t()) * float(w_scale)
    return out.float().reshape(*A.shape[:-1], N).to(A.dtype)


# ---- LLM.int8() -------------------------------------------------------------------------------


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    K = A.shape[-1]
    a = A.reshape(-1, K).float()
    outlier_cols = None
    is_outlier = torch.zeros_like(a, dtype=torch.bool)
    if threshold > 0.0:
        is_outlier = a.abs() >= threshold
        outlier_cols = is_outlier.any(dim=0).nonzero().reshape(-1)
    kept = torch.where(is_outlier, torch.zeros_like(a), a)
    bad = (~torch.isfinite(kept)).any(dim=1)
    finite_abs = torch.where(torch.isfinite(kept), kept.abs(), torch.zeros_like(kept))
    m = finite_abs.amax(dim=1) if K else torch.zeros(a.shape[0], device=a.device)
    scale = torch.full_like(m, 127.0) / m  # true division (127.0 / m in torch is 127 * (1 / m))
    # a row whose 127 / m overflows (tiny m) divides first: (a / m) * 127 (blockscale.h)
    scaled = torch.where(torch.isinf(scale)[:, None], (a / m[:, None]) * 127.0, a * scale[:, None])
    codes = torch.round(torch.clamp(scaled, -127.0, 127.0))
    codes = torch.where(is_outlier | (bad | (m == 0))[:, None], torch.zeros_like(codes), codes)
    if outlier_cols is not None and outlier_cols.numel():
        codes[:, outlier_cols] = 0
    row_stats = torch.where(bad, torch.full_like(m, float("nan")), m)
    return codes.to(torch.int8).reshape(A.shape), row_stats, outlier_cols


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    K = A.shape[-1]
    return ((A.reshape(-1, K).float() * stats.float()[:, None]) * INV_127).reshape(A.shape)


def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    # int64 products of exact integers, then int32: exact whenever int32 can hold the result.
    return (A.long() @ B.long().t()).to(torch.int32)


def int8_mm_dequant(A, row_stats, col_stats, dtype=None, bias=None) -> torch.Tensor:
    N = A.shape[-1]
    c = A.reshape(-1, N).float()
    out = (c * (row_stats.float()[:, None] * col_stats.float()[None, :])) * INV_127_SQ
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype or torch.float16).reshape(A.shape)


def int8_weight_dequant(W: torch.Tensor, W_scale: torch.Tensor) -> torch.Tensor:
    """fp32 weight of an LLM.int8() layer: W * SCB / 127 per output row."""
    return W.float() * (W_scale.float()[:, None] * INV_127)


def int8_linear(A, W, W_scale, bias=None, threshold: float = 0.0) -> torch.Tensor:
    K = A.shape[-1]
    a = A.reshape(-1, K)
    q, row_stats, cols = int8_vectorwise_quant(a, threshold)
    out = int8_mm_dequant(int8_linear_matmul(q, W), row_stats, W_scale, torch.float32, bias)
    if cols is not None and cols.numel():
        out = out + a[:, cols].float() @ int8_weight_dequant(W[:, cols], W_scale).t()
    return out.to(A.dtype).reshape(*A.shape[:-1], W.shape[0])


# ---- affine 4/8-bit (GPTQ / AWQ / HQQ / compressed-tensors weights, issue #13) -----------------
#
# Weight W [N, K], unsigned codes q of `bits` (4 or 8) bits, groups of `group_size` elements along K
# (group id of element (n, k) = (n * K + k) // group_size, group_size divides K), fp32 scale and
# zero per group. Decode, in fp32 in this order: w = (float(q) - zero) * scale; one rounding to the
# output dtype. 4-bit codes are packed as NF4 (element 2j in the high nibble of byte j, flat uint8
# [(N * K + 1) // 2]); 8-bit codes are one per byte, flat uint8 [N * K].


def _affine_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 4:
        return unpack_nibbles(packed, n)
    return packed.reshape(-1)[:n].long()


def decode_affine(packed, scales, zeros, bits: int, group_size: int, shape) -> torch.Tensor:
    """fp32 [N, K] values of an affine weight: (float(q) - zero[g]) * scale[g]."""
    n = math.prod(shape)
    q = _affine_codes(packed, bits, n).float()
    s = scales.float().reshape(-1).repeat_interleave(group_size)[:n]
    z = zeros.float().reshape(-1).repeat_interleave(group_size)[:n]
    return ((q - z) * s).reshape(tuple(shape))


def dequantize_affine(packed, scales, zeros, bits: int, group_size: int, shape, dtype):
    return decode_affine(packed, scales, zeros, bits, group_size, shape).to(dtype)


def quantize_affine(A: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Round-to-nearest min/max quantizer (the GPTQ/RTN convention), per group of the flattened
    [N, K] tensor, all in fp32 (csrc/kernels/cpu/affine.cpp does the same steps):
      * asymmetric: lo = min(min x, 0), hi = max(max x, 0) (0 is always exactly representable);
        symmetric: hi = max |x|, lo = -hi;
      * scale = (hi - lo) / qmax with qmax = 2^bits - 1 (if hi - lo overflows: hi / qmax - lo / qmax);
      * zero = clamp(rne(-lo / scale), 0, qmax) (asymmetric) or 2^(bits - 1) (symmetric), + 0.0 so
        that a zero is never -0.0;
      * q = clamp(rne(x / scale) + zero, 0, qmax), true fp32 division.
    Special groups: a group holding NaN/Inf stores scale NaN (it decodes to NaN); a group whose
    scale is 0 (all zeros, or a range that underflows) stores scale 0 (it decodes to zeros). Both
    store the asymmetric zero 0 (symmetric: 2^(bits - 1)) and every code equal to that zero.
    Returns (packed uint8 flat, scales fp32 [groups], zeros fp32 [groups])."""
    N, K = A.shape
    qmax = float(2**bits - 1)
    n = N * K
    x = A.reshape(-1).float().reshape(-1, group_size) if n else A.new_zeros((0, group_size)).float()
    fin = torch.isfinite(x)
    xz = torch.where(fin, x, torch.zeros_like(x))
    if symmetric:
        hi = xz.abs().amax(dim=1) if n else xz.new_zeros(0)
        lo = -hi
    else:
        hi = xz.amax(dim=1).clamp(min=0.0) if n else xz.new_zeros(0)
        lo = xz.amin(dim=1).clamp(max=0.0) if n else xz.new_zeros(0)
    scale = (hi - lo) / qmax
    scale = torch.where(torch.isinf(scale), hi / qmax - lo / qmax, scale)
    if symmetric:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = torch.round(-lo / scale).clamp(0.0, qmax) + 0.0
    finite = fin.all(dim=1)
    special = ~finite | ~(scale > 0)
    base_zero = float(2 ** (bits - 1)) if symmetric else 0.0
    zero = torch.where(special, torch.full_like(zero, base_zero), zero)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    scale = torch.where(finite & ~(scale > 0), torch.zeros_like(scale), scale)
    safe = torch.where(special, torch.ones_like(scale), scale)
    q = (torch.round(x / safe[:, None]) + zero[:, None]).clamp(0.0, qmax)
    q = torch.where(special[:, None], zero[:, None].expand_as(q), q)
    q = q.reshape(-1).to(torch.uint8)
    if bits == 4:
        if n % 2:
            q = torch.cat([q, q.new_zeros(1)])
        packed = pack_nibbles(q)
    else:
        packed = q
    return packed, scale, zero


def gemm_affine(A, packed, shapeB, scales, zeros, bits: int, group_size: int, bias=None):
    """A [..., K] @ dequant(W)^T (+ bias), fp32 accumulation, one rounding to A's dtype."""
    W = decode_affine(packed, scales, zeros, bits, group_size, tuple(shapeB))
    out = A.float() @ W.t().to(A.device)
    if bias is not None:
        out = out + bias.float()
    return out.to(A.dtype)


def cpu_gemm_affine_takes_int8(M: int, K: int, bits: int, group_size: int, A=None) -> bool:
    """Whether lowbit's CPU gemm_affine runs the int8-activation kernel (csrc/ops/cpu_gemm4.cpp,
    cpu_gemm_affine): 4-bit or 8-bit codes, 1 <= M <= 32, K % 64 == 0, group_size % 32 == 0
    (every half chunk of 32 elements inside one group), LOWBIT_CPU_GEMV=int8 on a SIMD CPU, and
    (when A is given) finite, moderate activations. A call whose int8 result holds NaN/Inf is
    recomputed exactly; gemm_affine_expected mirrors that through the exact result."""
    from lowbit._native import cpu_gemv_mode

    if not (cpu_gemv_mode() == "int8" and bits in (4, 8) and 1 <= M <= 32):
        return False
    if not (K > 0 and K % 64 == 0 and group_size % 32 == 0):
        return False
    return A is None or _q8_activations_ok(A.reshape(M, K))


def gemm_affine_q8(A, packed, shapeB, scales, zeros, bits: int, group_size: int, bias=None):
    """What gemm_affine computes on AVX2 / AVX-512 CPUs where cpu_gemm_affine_takes_int8: the
    activations quantized to int8 per 64-element chunk (quantize_activations_q8: x ~ xs_c * xq),
    the weight EXACT (its codes are integers already). Per 32-element half chunk h (chunk c, inside
    group g) the kernels form the exact integer sums I_h = sum xq * q and X_h = sum xq, and add
        xs_c * s_g * (I_h - z_g * X_h),
    which is what this computes, in the same factored form, in fp64. Where the kernels round
    (fp32): 4-bit, the sums xs_c * s_g * I_h per output and the zero term sum_h s_g z_g xs_c X_h
    once at the end; 8-bit, T = fma(-z_g, X, float(I)) per SIMD lane of 4-16 elements, one
    rounding, exact for integer zeros, then xs_c * s_g * T summed in fp32, so the error stays
    relative to |x| . |w| even where I_h and z_g * X_h nearly cancel (8-bit codes and zeros near
    255). fp32/fp16/bf16 [..., K] finite activations."""
    N, K = shapeB
    A2 = A.reshape(-1, K).float().cpu()
    M = A2.shape[0]
    q = _affine_codes(packed.cpu(), bits, N * K).reshape(N, K // 32, 32).double()
    gh = torch.arange(K // 32) * 32 // group_size  # group (within a row) of each half chunk
    gpr = K // group_size
    s = scales.cpu().double().reshape(N, gpr)[:, gh]  # [N, K / 32]
    z = zeros.cpu().double().reshape(N, gpr)[:, gh]
    xq, xs = quantize_activations_q8(A2)
    xq = xq.double().reshape(M, K // 32, 32)
    xs_h = xs.double().repeat_interleave(2, dim=1)  # [M, K / 32]: the chunk scale of each half
    out = A2.new_zeros((M, N), dtype=torch.float64)
    for h in range(K // 32):
        Ih = xq[:, h] @ q[:, h].t()  # [M, N], exact integers
        Xh = xq[:, h].sum(1, keepdim=True)  # [M, 1]
        out += xs_h[:, h : h + 1] * s[:, h] * (Ih - z[:, h] * Xh)
    if bias is not None:
        out = out + bias.double().cpu()
    return out.float().reshape(*A.shape[:-1], N).to(A.dtype).to(A.device)


def gemm_affine_expected(A, packed, shapeB, scales, zeros, bits, group_size, bias=None):
    """What lowbit's gemm_affine op computes on A's device: gemm_affine_q8 where the CPU takes the
    int8-activation kernel, bf16 weights where it takes the bf16 BLAS tier (cpu_blas_takes_bf16),
    the exact product (gemm_affine) everywhere else. Valid for inputs whose
    fp32 products do not overflow (the kernel hands a NaN/Inf int8 result to the exact kernels;
    this mirrors that through the exact result)."""
    K = shapeB[1]
    M = A.numel() // K if K else 0
    if (bits == 8 or K % 2 == 0) and cpu_blas_takes_bf16(M, A):
        W = decode_affine(packed, scales, zeros, bits, group_size, tuple(shapeB))
        out = _bf16_weight_product(A.reshape(M, K), W, bias)
        return out.reshape(*A.shape[:-1], shapeB[0])
    exact = gemm_affine(A, packed, shapeB, scales, zeros, bits, group_size, bias)
    if A.device.type != "cpu" or not cpu_gemm_affine_takes_int8(M, K, bits, group_size, A):
        return exact
    if not bool(torch.isfinite(exact).all()):
        return exact
    return gemm_affine_q8(A, packed, shapeB, scales, zeros, bits, group_size, bias)
