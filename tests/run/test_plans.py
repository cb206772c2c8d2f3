"""Options resolve once into frozen plans: methods as values, devices and dtypes parsed by one
parser, savers and torch.compile carried by the plan to every method alike."""

import dataclasses

import pytest
import torch

from randbp_cli.run.devices import dtype_name, resolve_device, resolve_dtype
from randbp_cli.run.distributed import SINGLE, init_distributed
from randbp_cli.run.engine import Engine
from randbp_cli.errors import ConfigError, DeviceError
from randbp_cli.run.methods import EXACT, Method, method_label, prepare_model
from randbp_cli.run.plans import FinetuneConfig, ProfileConfig, VarianceConfig
from randbp_cli.core.sketches import get_sketch


def test_methods_are_values():
    count = get_sketch("countsketch")
    both = Method.named("checkpoint+randomized", 0.1, count)
    assert (both.checkpoint, both.randomized, both.name, both.label) == (
        True, True, "checkpoint+randomized", "checkpoint+countsketch rho=0.1")
    assert Method.named("checkpoint", 0.1, count) == Method(checkpoint=True)  # ρ and sketch only when randomized
    assert Method(rho=0.5, sketch=get_sketch("countsketch")) == Method(rho=0.5, sketch=count)  # sketches by name
    assert len({Method(rho=0.5, sketch=count), Method(rho=0.5, sketch=get_sketch("countsketch")), EXACT}) == 2
    assert EXACT.label == "exact" and EXACT.sketch_name is None
    assert method_label("checkpoint+randomized", 0.5, "crs") == "checkpoint+crs rho=0.5"
    with pytest.raises(ConfigError, match="unknown method"):
        Method.named("offload")
    with pytest.raises(ValueError):
        Method(rho=0.5)  # randomized without a sketch


def test_profile_plan_cases_in_order_each_once():
    config = ProfileConfig(model="roberta-tiny", rhos=[0.5, 0.1, 0.5], sketches=["CountSketch", "crs", "countsketch"],
                           methods=["checkpoint", "randomized"], batch_sizes=[4, 2, 4], warmup=1, steps=2, device="cpu")
    plan = config.resolve()
    labels = [case.label for case in plan.cases]
    assert labels[:6] == ["exact b=4", "countsketch rho=0.5 b=4", "countsketch rho=0.1 b=4", "crs rho=0.5 b=4",
                          "crs rho=0.1 b=4", "checkpoint b=4"]
    assert len(labels) == 12 and labels[6] == "exact b=2"
    assert plan.device == torch.device("cpu") and plan.dtype == torch.float32
    assert plan.total_steps == 12 * (1 + 1 + 2)
    config.rhos.append(0.2)  # the plan keeps its own copy of the options
    assert plan.config.rhos == [0.5, 0.1, 0.5] and plan.config_record()["rhos"] == [0.5, 0.1, 0.5]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.device = torch.device("meta")


def test_finetune_and_variance_plans():
    runs = FinetuneConfig(task="synthetic", rhos=[0.5, 0.2], compare=True, sketch="crs", device="cpu").resolve()
    assert [m.label for m in runs.methods] == ["exact", "crs rho=0.5", "crs rho=0.2"]
    assert runs.model_name == "roberta-tiny" and runs.task.name == "synthetic"
    chosen = FinetuneConfig(task="rte", methods=["checkpoint+randomized"], rhos=[0.1], device="cpu").resolve()
    assert [m.name for m in chosen.methods] == ["checkpoint+randomized"] and chosen.task.name == "rte"
    assert FinetuneConfig(task="rte", device="cpu").resolve().methods == (EXACT,)
    variance = VarianceConfig(task="synthetic", sketches=["gaussian", "gaussian"], train_rho=0.25, sketch="crs",
                              device="cpu").resolve()
    assert [s.name for s in variance.sketches] == ["gaussian", "gaussian"]  # measured as often as named
    assert variance.train_method.label == "crs rho=0.25"
    assert VarianceConfig(task="synthetic", device="cpu").resolve().train_method == EXACT


def test_one_device_and_dtype_parser():
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_dtype("bf16") is torch.bfloat16 and dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(ConfigError, match="unsupported device"):
        resolve_device("meta")
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("int8")
    assert init_distributed(1, 0, 0, "auto", torch.device("cpu")) == (SINGLE, torch.device("cpu"))
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_prepare_model_applies_the_savers_with_the_method(tiny_roberta):
    from randbp_cli import converted_names, saver_names
    from randbp_cli.core.sketches import get_sketch

    model = prepare_model(tiny_roberta, Method(rho=0.5, sketch=get_sketch("countsketch"), savers=("dropout",)))
    assert saver_names(model) == ["dropout"] and converted_names(model)
    model = prepare_model(model, Method())
    assert saver_names(model) == [] and not converted_names(model)


def test_resolve_parses_each_value_once_into_typed_values(tiny_roberta, monkeypatch):
    """ρ a float, the sketch a Sketch, the savers SaverSpecs: the library takes them as they are,
    so nothing after `resolve()` parses a saver name again."""
    from randbp_cli import saver_names
    from randbp_cli.core.sketch import Sketch
    from randbp_cli.savers import registry
    from randbp_cli.savers.registry import SaverSpec

    plan = ProfileConfig(rhos=[0.5], sketches=["countsketch"], savers=["gelu:2", "dropout"],
                         device="cpu").resolve()
    randomized = next(case.method for case in plan.cases if case.method.randomized and case.method.savers)
    assert isinstance(randomized.rho, float) and isinstance(randomized.sketch, Sketch)
    assert randomized.savers == (SaverSpec("gelu", 2), SaverSpec("dropout"))
    assert randomized.saver_names == ["gelu:2", "dropout"] and randomized.label.endswith("+gelu:2 +dropout")

    def parsed_again(*args):
        raise AssertionError("a saver name was parsed again after resolve()")

    for saver in registry.SAVERS.values():
        monkeypatch.setattr(saver, "parse", parsed_again)
    model = prepare_model(tiny_roberta, randomized)
    assert saver_names(model) == ["dropout", "gelu:2"]


@pytest.fixture
def quick_compile(monkeypatch):
    """torch.compile through aot_eager: the same Dynamo and AOTAutograd tracing, no code generation."""
    calls = []
    real = torch.compile

    def compile_(module, mode=None, **kwargs):
        calls.append(mode)
        return real(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_)
    yield calls
    torch._dynamo.reset()


def test_compiled_engine_keeps_one_compiled_tree_per_method_sharing_the_parameters(tiny_roberta, quick_compile):
    from conftest import tiny_batch
    from randbp_cli.core.sketches import get_sketch

    engine = Engine(tiny_roberta, torch.device("cpu"), compile="default")
    engine.use_optimizer(torch.optim.SGD(engine.model.parameters(), lr=0.1))
    randomized = Method(rho=0.5, sketch=get_sketch("balanced"))
    batch = tiny_batch(tiny_roberta)
    engine.apply(randomized)
    first = engine.runner
    before = next(tiny_roberta.parameters()).detach().clone()
    engine.step(batch)  # trains the shared parameters through the compiled tree
    assert not torch.equal(next(tiny_roberta.parameters()), before)
    engine.apply(Method())
    assert engine.runner is not first and not engine.converted
    engine.step(batch)
    engine.apply(randomized)
    assert engine.runner is first and engine.converted  # compiled once, then reused
    assert quick_compile == ["default", "default"]
    assert {id(p) for p in engine.model.parameters()} == {id(p) for p in tiny_roberta.parameters()}



def test_savers_go_with_every_method_but_the_plain_baselines():
    """profile shows every method plain and with the savers; finetune's --compare run stays plain."""
    plan = ProfileConfig(model="roberta-tiny", rhos=[0.1], sketches=["countsketch"], savers=["gelu:2", "dropout"],
                         device="cpu").resolve()
    assert [case.method.label for case in plan.cases] == [
        "exact", "exact +gelu:2 +dropout", "countsketch rho=0.1", "countsketch rho=0.1 +gelu:2 +dropout"]
    runs = FinetuneConfig(task="synthetic", rhos=[0.1], compare=True, savers=["dropout"], device="cpu").resolve()
    assert [m.label for m in runs.methods] == ["exact", "balanced rho=0.1 +dropout"]
    alone = FinetuneConfig(task="synthetic", methods=["exact"], compare=True, savers=["dropout"], device="cpu").resolve()
    assert [m.label for m in alone.methods] == ["exact", "exact +dropout"]
    variance = VarianceConfig(task="synthetic", train_rho=0.5, savers=["gelu:3"], device="cpu").resolve()
    assert variance.train_method.label == "balanced rho=0.5 +gelu:3"
    for bad, message in [(["gelu:9"], "bit count"), (["nope"], "unknown saver"), (["dropout", "dropout"], "twice")]:
        with pytest.raises(ConfigError, match=message):
            ProfileConfig(savers=bad, device="cpu").resolve()


def test_compile_mode_resolves_by_device():
    assert ProfileConfig(device="cpu").resolve().compile is None
    assert ProfileConfig(device="cpu", compile=True).resolve().compile == "default"
    assert FinetuneConfig(task="synthetic", device="cpu", compile=True, compile_mode="max-autotune").resolve().compile \
        == "max-autotune"
    with pytest.raises(ConfigError, match="needs --compile"):
        ProfileConfig(device="cpu", compile_mode="default").resolve()
    with pytest.raises(ConfigError, match="unknown --compile-mode"):
        ProfileConfig(device="cpu", compile=True, compile_mode="fast").resolve()


def test_eager_warm_up_runs_exactly_the_steps_asked_and_compiled_until_nothing_compiles(tiny_roberta, quick_compile):
    """`--warmup 0` eagerly means no step at all; compiled, warm-up goes on until a step compiles
    nothing (here the first compiles, transformers' first-call setup recompiles once)."""
    from conftest import tiny_batch

    eager = Engine(tiny_roberta, torch.device("cpu"))
    eager.use_optimizer(torch.optim.SGD(eager.model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in eager.model.parameters()]
    assert eager.warm_up(tiny_batch(tiny_roberta), 0) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, eager.model.parameters()))
    compiled = Engine(tiny_roberta, torch.device("cpu"), compile="default")
    compiled.use_optimizer(torch.optim.SGD(compiled.model.parameters(), lr=0.0))
    compiled.apply(EXACT)
    assert compiled.warm_up(tiny_batch(tiny_roberta), 1) >= 3
