"""GPTQ (Frantar et al., 2022) for the demo: int4 codes chosen with second-order error feedback.

This is how calibrated compressed-tensors checkpoints are made (llm-compressor's GPTQModifier):
per linear layer, H = mean of x x^T over calibration tokens; columns are quantized left to right
and each column's rounding error, scaled by the inverse Hessian's Cholesky factor, is pushed onto
the columns not yet quantized. Groups of `group_size` columns get min/max scale and zero from the
error-updated weights when quantization reaches them. No act-order: groups stay in input order.
Written from the paper's Algorithm 1; nothing here is copied from another library.
"""

from __future__ import annotations

import torch

# Calibration text, disjoint from the demo's evaluation sentences (lowbit.cli.demo.SENTENCES).
CALIBRATION = [
    "The weather forecast predicts heavy snow in the mountains this weekend.",
    "Our team released a new version of the software with many bug fixes.",
    "She read the novel in one sitting and could not stop thinking about it.",
    "Electric cars are becoming cheaper as battery prices continue to drop.",
    "The orchestra performed a symphony by Beethoven to a full concert hall.",
    "Please send the quarterly report to the finance department by Friday.",
    "A group of hikers got lost in the forest and were rescued at night.",
    "Researchers discovered a new species of frog in the rainforest.",
    "The restaurant on the corner serves the best noodles in town.",
    "Vaccines train the immune system to recognize dangerous pathogens.",
    "He repaired the old bicycle and rode it to work every day.",
    "The city council voted to build a new park near the river.",
    "Learning a second language improves memory and attention.",
    "The spacecraft entered orbit around Mars after a seven month journey.",
    "My grandmother tells stories about growing up on a farm.",
    "The company reported record profits despite the economic slowdown.",
    "Students gathered in the library to prepare for final exams.",
    "Rising sea levels threaten coastal cities around the world.",
    "The detective found a hidden letter inside the antique desk.",
    "Regular exercise reduces the risk of heart disease and stroke.",
    "The airline cancelled dozens of flights because of the storm.",
    "A new bridge will connect the two sides of the valley.",
    "The painter used bright colors to capture the summer light.",
    "Which programming language should I learn first for data science?",
    "The football match ended in a draw after extra time.",
    "Bees play a crucial role in pollinating fruit and vegetable crops.",
    "The museum displays ancient pottery from several civilizations.",
    "I lost my keys somewhere between the station and the office.",
    "The government announced new rules for renewable energy subsidies.",
    "A cup of green tea in the afternoon helps me stay focused.",
    "The volcano erupted, sending ash high into the atmosphere.",
    "They adopted a small puppy from the local animal shelter.",
]


@torch.no_grad()
def hessians(model, batch, names) -> dict[str, torch.Tensor]:
    """{layer name: mean x x^T (fp64) over the calibration batch's real (unpadded) tokens}."""
    mods = {n: model.get_submodule(n) for n in names}
    H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in mods.items()}
    count = dict.fromkeys(names, 0)
    real = batch["attention_mask"].bool()

    def hook(name):
        def fn(mod, inputs, out):
            x = inputs[0]
            x = x[real] if x.dim() == 3 else x  # drop padding positions
            x = x.reshape(-1, x.shape[-1]).double()
            H[name] += x.t() @ x
            count[name] += x.shape[0]

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {n: H[n] / max(count[n], 1) for n in names}


@torch.no_grad()
def gptq(W: torch.Tensor, H: torch.Tensor, group_size: int, bits: int = 4, damp: float = 0.01):
    """(codes int64 [N, K], scales [N, K/g], zeros [N, K/g]) of W [N, K] (asymmetric min/max
    groups, K % group_size == 0), with GPTQ's error feedback through the Hessian H [K, K]."""
    W = W.detach().double().clone()
    N, K = W.shape
    qmax = 2**bits - 1
    H = H.clone()
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    # Upper Cholesky factor of H^-1 (factorised in fp64, applied in fp32): row i holds the update
    # direction for column i's error.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Hinv, W = Hinv.float(), W.float()
    codes = torch.zeros(N, K, dtype=torch.int64)
    scales = torch.zeros(N, K // group_size, dtype=torch.float32)
    zeros = torch.zeros_like(scales)
    for i1 in range(0, K, group_size):  # one block per group: its scale from the updated block
        i2 = i1 + group_size
        W1 = W[:, i1:i2].clone()
        err = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        lo, hi = W1.amin(1).clamp(max=0), W1.amax(1).clamp(min=0)
        s = ((hi - lo) / qmax).clamp(min=1e-12)
        z = torch.round(-lo / s).clamp(0, qmax)
        scales[:, i1 // group_size], zeros[:, i1 // group_size] = s, z
        for i in range(group_size):
            w = W1[:, i]
            q = (torch.round(w / s) + z).clamp(0, qmax)
            codes[:, i1 + i] = q.long()
            e = (w - (q - z) * s) / Hb[i, i]
            W1[:, i:] -= e[:, None] * Hb[i, i:][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return codes, scales, zeros
