"""convert()/restore(): same Parameter objects, patterns, validate-then-replace, HF encoders."""

import pytest
import torch
from torch import nn

from conftest import tiny_batch
from randbp_cli import RandomizedLinear, convert, converted_names, restore
from randbp_cli.core.convert import describe_conversion, linear_names, skipped_linears
from randbp_cli.errors import ConfigError


def test_convert_every_linear_keeps_parameters_and_optimizer(tiny_roberta):
    model = tiny_roberta
    names_before = linear_names(model)
    params_before = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before the conversion
    originals = {name: model.get_submodule(name) for name in names_before}

    model = convert(model, 0.5, sketch="countsketch")
    assert converted_names(model) == names_before
    assert all(isinstance(model.get_submodule(n), RandomizedLinear) for n in names_before)
    assert linear_names(model) == []
    assert all(params_before[name] is p for name, p in model.named_parameters())  # same objects
    assert describe_conversion(model)["randomized_layers"] == len(names_before)

    before = {name: p.detach().clone() for name, p in params_before.items()}
    batch = tiny_batch(model)
    model(**batch).loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "roberta.encoder.layer.0.attention.self.query.weight" in changed

    model = restore(model)
    assert converted_names(model) == []
    assert all(model.get_submodule(n) is originals[n] for n in names_before)  # the very same modules
    assert all(params_before[name] is p for name, p in model.named_parameters())


def test_forward_unchanged_by_conversion(tiny_roberta):
    model = tiny_roberta.eval()
    batch = tiny_batch(model)
    with torch.no_grad():
        before = model(**batch).logits
        convert(model, 0.1)
        after = model(**batch).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("include, expected", [
    (["query", "key", "value"], 6),                    # suffix match, 2 layers
    ("*.attention.self.*", 6),                         # glob
    (["re:.*intermediate\\.dense"], 2),                # regex
    ("roberta.encoder.layer.0.output.dense", 1),       # exact name
])
def test_include_patterns(tiny_roberta, include, expected):
    model = convert(tiny_roberta, 0.5, include=include)
    assert len(converted_names(model)) == expected


def test_exclude_patterns(tiny_roberta):
    total = len(linear_names(tiny_roberta))
    model = convert(tiny_roberta, 0.5, exclude=["classifier.*"])
    assert len(converted_names(model)) == total - 2
    assert not any(n.startswith("classifier") for n in converted_names(model))


def test_bad_pattern_leaves_model_untouched(tiny_roberta):
    with pytest.raises(ConfigError, match="matches no nn.Linear"):
        convert(tiny_roberta, 0.5, include=["query", "no_such_layer"])
    assert converted_names(tiny_roberta) == []
    with pytest.raises(ConfigError, match="select nothing"):
        convert(tiny_roberta, 0.5, include="query", exclude="query")
    with pytest.raises(ConfigError, match="rho"):
        convert(tiny_roberta, 1.5)
    assert converted_names(tiny_roberta) == []


def test_reconvert_changes_settings(tiny_roberta):
    model = convert(tiny_roberta, 0.5)
    model = convert(model, 0.1, sketch="rademacher")
    layers = describe_conversion(model)["layers"]
    assert {(v["rho"], v["sketch"]) for v in layers.values()} == {(0.1, "rademacher")}
    assert len(converted_names(restore(model))) == 0


def test_hooks_and_training_flag_survive():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.eval()
    convert(model, 0.5)
    model(torch.randn(3, 4))
    assert seen == [torch.Size([3, 4])] and not model[0].training
    model.train()
    restore(model)
    assert model[0].training


def test_tied_module_becomes_one_randomized_module():
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": shared, "b": shared})
    convert(model, 0.5)
    assert model["a"] is model["b"] and isinstance(model["a"], RandomizedLinear)
    restore(model)
    assert model["a"] is shared and model["b"] is shared


def test_linear_subclasses_left_alone():
    mha = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict({"attn": mha, "proj": nn.Linear(8, 8)})
    convert(model, 0.5)
    assert converted_names(model) == ["proj"]
    assert skipped_linears(model) == ["attn.out_proj (NonDynamicallyQuantizableLinear)"]


def test_root_linear():
    layer = nn.Linear(3, 3)
    new = convert(layer, 0.5)
    assert isinstance(new, RandomizedLinear) and new.weight is layer.weight
    assert restore(new) is layer


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_other_hugging_face_encoders(model_type):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kwargs = {"bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=100, max_position_embeddings=64),
              "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100,
                                 max_position_embeddings=64)}[model_type]
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForSequenceClassification.from_config(config)
    n_linear = len(linear_names(model))
    model = convert(model, 0.5, sketch="countsketch")
    assert len(converted_names(model)) == n_linear > 0
    ids = torch.randint(0, 100, (2, 10))
    out = model(input_ids=ids, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "embeddings" not in n)


def test_restore_undoes_savers_too_and_convert_keeps_them(tiny_roberta):
    from randbp_cli import apply_savers, saver_names

    model = apply_savers(tiny_roberta, ["dropout", "gelu:2"])
    model = convert(model, 0.5)  # converting keeps the savers
    assert saver_names(model) == ["dropout", "gelu:2"] and converted_names(model)
    model = convert(model, 0.2)  # re-converting too
    assert saver_names(model) == ["dropout", "gelu:2"]
    model = restore(model)
    assert saver_names(model) == [] and converted_names(model) == []


def test_what_the_readme_calls_is_importable_from_the_package():
    """The README's library section names `skipped_linears(model)`, which `randbp_cli` did not export."""
    import re
    from pathlib import Path

    import randbp_cli

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Use it from your training script", 1)[1].split("\n## ", 1)[0]
    called = set(re.findall(r"`([A-Za-z_]\w*)\(", section))
    imported = {name.strip() for line in re.findall(r"from randbp_cli import (.+)", section) for name in line.split(",")}
    assert "skipped_linears" in called and len(called | imported) >= 5
    missing = sorted(name for name in called | imported if name not in randbp_cli.__all__)
    assert not missing, missing
