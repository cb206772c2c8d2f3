"""Shared fixtures. Tests never touch the network: the Hub is switched off before any import."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU tensors (before any import of them)
    os.environ.setdefault("TRITON_INTERPRET", "1")

def requires_cuda(test):
    """Marks a test `gpu` and skips it cleanly on machines without CUDA."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.gpu(skip(test))


@pytest.fixture
def tiny_roberta():
    """The built-in roberta-tiny architecture, random init, train mode."""
    from randbp_cli.data.models import load_model

    model = load_model("roberta-tiny", offline=True).model
    model.train()
    return model


def tiny_batch(model, batch_size=2, seq_len=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, model.config.num_labels, (batch_size,), generator=gen)}
