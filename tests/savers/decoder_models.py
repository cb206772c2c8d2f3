"""What the decoder savers' tests share: a tiny decoder (optionally with LoRA), a padded batch, and
every parameter's gradient after one backward."""

import torch

from randbp_cli.data.models import load_model
from randbp_cli.run.lora import apply_lora, lora_spec


def tiny_decoder(name: str, lora: int | None = None):
    """`llama-tiny` or `gpt2-tiny`, seeded, in training mode; with LoRA, lora_B nonzero."""
    torch.manual_seed(0)
    model = load_model(name, offline=True).model
    if lora:
        model = apply_lora(model, lora_spec(lora))
        for param_name, param in model.named_parameters():  # PEFT starts lora_B at zero: give lora_A a gradient
            if "lora_B" in param_name:
                torch.nn.init.normal_(param, std=0.1)
    return model.train()


def padded_batch(vocab: int, batch=2, seq=12):
    """Right padding on the second row (labels -100 there), as the finetune collator makes."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, seq - 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def grads(model, batch, run=lambda m, b: m(**b).loss):
    """Every parameter's gradient after one backward (the same dropout masks every call: GPT-2 has dropout)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    run(model, batch).float().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
