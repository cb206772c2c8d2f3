"""Which model types randbp trains, and with which head.

Encoders (`ENCODER_TYPES`) get a sequence-classification head, as the paper fine-tuned RoBERTa on
GLUE. Decoder LMs (`DECODER_TYPES`) keep their causal-LM head and train on next-token prediction:
labels are the input ids, shifted by one inside the model, padding ignored (-100). Each type listed
is checked on a tiny config (tests/data/test_models.py): built, profiled exact and randomized.
Anything else (an encoder-decoder such as T5, a decoder not verified here) is a ConfigError that
says what randbp does train, before the model is built.
"""

from __future__ import annotations

from ..errors import ConfigError

SEQUENCE_CLASSIFICATION = "sequence-classification"
CAUSAL_LM = "causal-lm"

ENCODER_TYPES = ("albert", "bert", "camembert", "convbert", "data2vec-text", "deberta", "deberta-v2", "distilbert",
                 "electra", "ernie", "megatron-bert", "mobilebert", "mpnet", "roberta", "roberta-prelayernorm",
                 "roformer", "xlm-roberta", "xlm-roberta-xl")
# Llama-family decoders (nn.Linear projections, RMSNorm, SwiGLU) and GPT-2 (transformers' Conv1D)
DECODER_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


def head_for(config, name: str) -> str:
    """The head randbp trains a model of `config`'s type with; a ConfigError for any other type."""
    model_type = getattr(config, "model_type", None)
    if model_type in ENCODER_TYPES:
        return SEQUENCE_CLASSIFICATION
    if model_type in DECODER_TYPES and not getattr(config, "is_encoder_decoder", False):
        return CAUSAL_LM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = (" (an encoder-decoder)" if getattr(config, "is_encoder_decoder", False)
            else " (a decoder)" if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "")
    raise ConfigError(f"model {name!r} is a {model_type} model{kind}, which randbp does not train: it supports "
                      f"encoders with a sequence-classification head ({', '.join(ENCODER_TYPES)}) and decoder "
                      f"language models ({', '.join(DECODER_TYPES)})")


def auto_class(head: str):
    """transformers' Auto class that builds a model with `head`."""
    import transformers

    return {SEQUENCE_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
            CAUSAL_LM: transformers.AutoModelForCausalLM}[head]


def head_of(model) -> str:
    """The head of a model randbp loaded (or any transformers model): causal LM or classification."""
    config = getattr(model, "config", None)
    return CAUSAL_LM if getattr(config, "model_type", None) in DECODER_TYPES else SEQUENCE_CLASSIFICATION
