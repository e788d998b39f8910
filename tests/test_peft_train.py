"""PEFT's prepare_model_for_kbit_training + LoRA + Transformers' Trainer on lowbit 4-bit and 8-bit
models: a few optimizer steps on a tiny random Llama; the loss stays finite, the adapters move,
the quantized base stays bit-identical."""

import math

import pytest
import torch

import _helpers_nn

peft = pytest.importorskip("peft", reason="QLoRA needs peft")
transformers = pytest.importorskip("transformers", reason="Trainer needs transformers")

import lowbit  # noqa: E402
from lowbit import nn as lnn  # noqa: E402

CONFIGS = {
    "nf4": lowbit.LowbitConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    ),
    "fp4": lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": lowbit.LowbitConfig(load_in_8bit=True),
}


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12, vocab=256):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("checkpointing", [True, False])
def test_trainer_qlora_steps(name, checkpointing, tmp_path):
    model = _helpers_nn.tiny_llama(tie=False, vocab_size=256).train()
    model = lowbit.quantize_model(model, CONFIGS[name])
    quantized = (lnn.Linear4bit, lnn.Linear8bitLt)
    assert isinstance(model.model.layers[0].self_attn.q_proj, quantized)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert adapters and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result.training_loss)

    after = dict(model.named_parameters())
    # LoRA's B starts at zero; the optimizer moved every one of them
    assert all(not torch.equal(after[n].detach(), p) for n, p in adapters.items())
    # the quantized base (codes, scales) and every other frozen weight are bit-identical
    assert all(torch.equal(after[n].detach(), p) for n, p in base.items())
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, quantized) and q.is_quantized
