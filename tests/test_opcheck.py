"""torch.library.opcheck on every op and overload: schema, fake kernel, autograd registration and
AOT dispatch must all agree with the real kernel."""

import pytest
import torch

import lowbit.functional as F

ops = torch.ops.lowbit


def _cases(device):
    A = torch.randn(33, 70, device=device)
    code8 = F.create_dynamic_map().to(device)
    q8, absmax8 = ops.quantize_blockwise(A, code8, 64)
    packed, absmax4 = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    code4 = F.get_4bit_type("nf4", device=device)
    W, SCB, _ = ops.int8_vectorwise_quant(torch.randn(24, 70, device=device))
    C = torch.randint(-1000, 1000, (33, 24), dtype=torch.int32, device=device)
    qa = torch.randint(-127, 128, (33, 70), dtype=torch.int8, device=device)
    act = torch.randn(5, 70, device=device)
    act_grad = torch.randn(5, 70, device=device, requires_grad=True)
    # double quantization: absmax4 as uint8 codes over nested blocks of 64
    offset = absmax4.mean()
    qabsmax4, nested_absmax = ops.quantize_blockwise(absmax4 - offset, code8, 64)
    nested = (qabsmax4, code4, 64, nested_absmax, code8, float(offset), 64)
    return [
        (ops.quantize_blockwise.default, (A, code8, 64)),
        (ops.dequantize_blockwise.default, (q8, absmax8, code8, 64, torch.bfloat16)),
        (
            ops.dequantize_blockwise.out,
            (q8, absmax8, code8, 64, torch.float32),
            {"out": torch.empty(33, 70, device=device)},
        ),
        (ops.quantize_4bit.default, (A, 64, "fp4", torch.uint8)),
        (ops.quantize_4bit.default, (A[:32].half(), 128, "nf4", torch.bfloat16)),
        (ops.dequantize_4bit.default, (packed, absmax4, 64, "nf4", [33, 70], torch.float16)),
        (
            ops.dequantize_4bit.out,
            (packed, absmax4, 64, "nf4", [33, 70], torch.float32),
            {"out": torch.empty(33, 70, device=device)},
        ),
        (ops.gemv_4bit.default, (act, packed, [33, 70], absmax4, code4, 64)),
        (ops.gemv_4bit.default, (act_grad, packed, [33, 70], absmax4, code4, 64)),
        (ops.gemv_4bit.default, (act[:1], packed, [33, 70], *nested)),
        (ops.gemv_4bit.default, (act_grad, packed, [33, 70], *nested)),
        (ops.int8_vectorwise_quant.default, (A * 3, 0.0)),
        (ops.int8_vectorwise_quant.default, (A * 3, 6.0)),
        (ops.int8_vectorwise_dequant.default, (qa, torch.rand(33, device=device))),
        (ops.int8_linear_matmul.default, (qa, W)),
        (
            ops.int8_linear_matmul.out,
            (qa, W),
            {"out": torch.empty(33, 24, dtype=torch.int32, device=device)},
        ),
        (
            ops.int8_mm_dequant.default,
            (C, torch.rand(33, device=device), SCB, torch.bfloat16, torch.randn(24, device=device)),
        ),
        (ops.int8_mm_dequant.default, (C, torch.rand(33, device=device), SCB)),
        (ops.int8_linear.default, (act * 3, W, SCB, torch.randn(24, device=device), 6.0)),
        (ops.int8_linear.default, (act_grad, W, SCB, None, 0.0)),
    ]


def _ids():
    return [f"{c[0]}-{i}" for i, c in enumerate(_cases("cpu"))]


@pytest.mark.parametrize("index", range(len(_ids())), ids=_ids())
def test_opcheck(device, index):
    case = _cases(device)[index]
    op, args = case[0], case[1]
    kwargs = case[2] if len(case) > 2 else {}
    torch.library.opcheck(op, args, kwargs)
