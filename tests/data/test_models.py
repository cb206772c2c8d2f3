"""Where models come from and where they go (models.py): what --model accepts, what it refuses
up front, and the checkpoint --save-model writes."""

import os
import stat

import pytest

from randbp_cli.data.models import load_model, save_model


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_model_directory_honours_the_umask(tmp_path, umask, mask):
    """--save-model's directory was mkdtemp's 0700, renamed into place."""
    umask(mask)
    saved = tmp_path / "model"
    save_model(load_model("roberta-tiny", offline=True).model, None, saved)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((saved / "config.json").stat().st_mode) == 0o666 & ~mask


# ---------------------------------------------------------------------------- which models


SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=300,
             max_position_embeddings=40)


def _config_dir(tmp_path, model_type, **overrides):
    """A directory holding only a tiny config.json of `model_type` (random init, no network)."""
    from transformers import AutoConfig

    sizes = {"distilbert": dict(n_layers=2, dim=32, n_heads=2, hidden_dim=64, vocab_size=300,
                                max_position_embeddings=40),
             "albert": dict(SMALL, embedding_size=16),
             "gpt2": dict(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=40),
             "t5": dict(num_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16, vocab_size=300)}
    directory = tmp_path / model_type
    AutoConfig.for_model(model_type, **{**sizes.get(model_type, SMALL), **overrides}).save_pretrained(directory)
    return directory


def _cli(*args):
    from typer.testing import CliRunner

    from randbp_cli.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _refused(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("randbp: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_encoder_decoders_are_refused_up_front(tmp_path):
    """A T5 config crashed with an AttributeError."""
    model = _config_dir(tmp_path, "t5")
    _refused(_cli("profile", "--model", model, "-b", "2", "--seq-len", "8", "--steps", "1", "--warmup", "0",
                  "--device", "cpu"), "is a t5 model (an encoder-decoder)", "bert, camembert", "llama")
    _refused(_cli("finetune", "--model", model, "--train-file", tmp_path / "none.csv", "--validation-file",
                  tmp_path / "none.csv", "--text-columns", "text", "--device", "cpu"), "is a t5 model")


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_decoders_profile_as_causal_lms_and_classification_is_refused_up_front(tmp_path, model):
    """A decoder keeps its causal-LM head (labels: the input ids) and profiles exact and randomized;
    a classification task refuses it in one line before any data is read."""
    from randbp_cli.commands.profile import run_profile
    from randbp_cli.run.plans import ProfileConfig

    directory = _config_dir(tmp_path, model) if model == "gpt2" else "llama-tiny"
    loaded = load_model(str(directory), offline=True)
    assert loaded.head == "causal-lm" and type(loaded.model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    report = run_profile(ProfileConfig(model=str(directory), rhos=[0.5], batch_sizes=[2], seq_len=8, steps=1,
                                       warmup=0, device="cpu", offline=True))
    exact, randomized = report["results"]
    assert report["model"]["head"] == "causal-lm" and randomized["randomized_layers"] > 0
    assert 0 < randomized["activation_bytes"] < exact["activation_bytes"]
    # by kind: the loss keeps log-softmax of the logits (fp32), the shifted labels and a scalar
    kinds, config, tokens = exact["activation_bytes_by_kind"], loaded.model.config, 2 * 8
    assert kinds["logits"] == tokens * config.vocab_size * 4 + tokens * 8 + 4
    assert all(kinds[part] > 0 for part in ("attention", "mlp", "norms"))
    if model == "llama":  # SwiGLU keeps the gate, SiLU(gate) and up: 3 × d_ff per token per layer
        assert kinds["mlp"] == 3 * config.intermediate_size * config.num_hidden_layers * tokens * 4
    _refused(_cli("finetune", "--model", directory, "--task", "rte", "--data-dir", tmp_path, "--device", "cpu"),
             "is a decoder language model", "randbp profile")
    _refused(_cli("variance", "--model", directory, "--task", "synthetic", "--device", "cpu"),
             "is a decoder language model")


def test_checkpointing_a_model_without_it_is_refused_up_front(tmp_path):
    """ALBERT trains randomized, but transformers has no activation checkpointing for it."""
    model = _config_dir(tmp_path, "albert")
    _refused(_cli("profile", "--model", model, "--method", "checkpoint", "-b", "2", "--seq-len", "8", "--steps", "1",
                  "--warmup", "0", "--device", "cpu"), "AlbertForSequenceClassification", "checkpointing")
    _refused(_cli("finetune", "--model", model, "--task", "synthetic", "--method", "checkpoint", "--max-steps", "1",
                  "--device", "cpu"), "AlbertForSequenceClassification", "checkpointing")


@pytest.mark.parametrize("model_type", __import__("randbp_cli.data.heads", fromlist=["ENCODER_TYPES"]).ENCODER_TYPES)
def test_every_supported_encoder_profiles_and_trains(tmp_path, model_type):
    """What ENCODER_TYPES claims: each builds from a tiny config, profiles exact, randomized and,
    where transformers has it, checkpointed, at the longest input its positions allow (RoBERTa's
    kin lose padding_idx + 1 positions; the old list of them missed MPNet and data2vec-text), and
    fine-tunes a randomized step on the synthetic task."""
    from randbp_cli.commands.finetune import run_finetune
    from randbp_cli.data.models import max_sequence_length
    from randbp_cli.run.plans import FinetuneConfig, ProfileConfig
    from randbp_cli.commands.profile import run_profile

    model = str(_config_dir(tmp_path, model_type))
    loaded = load_model(model, offline=True)
    methods = ["randomized"] + ["checkpoint+randomized"] * loaded.model.supports_gradient_checkpointing
    report = run_profile(ProfileConfig(model=model, rhos=[0.5], sketches=["countsketch"], batch_sizes=[2],
                                       seq_len=max_sequence_length(loaded.model), steps=1, warmup=0, device="cpu",
                                       methods=methods, offline=True))
    assert [r["method"] for r in report["results"]] == ["exact", *methods]
    assert all(r["activation_bytes"] > 0 for r in report["results"])
    trained = run_finetune(FinetuneConfig(task="synthetic", model=model, rhos=[0.5], sketch="countsketch", max_steps=1,
                                          max_train_samples=8, max_eval_samples=4, batch_size=4, device="cpu",
                                          offline=True))
    assert trained["runs"][0]["converted_layers"]["count"] > 0
