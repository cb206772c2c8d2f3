"""Byte accounting exact on a toy model whose every saved tensor is computed by hand."""

import torch
from torch import nn

from conftest import requires_cuda
from randbp_cli import SavedTensorCounter, convert
from randbp_cli.measure.memory import KINDS, fold_layer_indices
from randbp_cli.measure.meters import NvmlSampler, cuda_step_memory, nvml_info, summarize_times

F32 = 4


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _count(model, x, exclude):
    with SavedTensorCounter(model, exclude=exclude) as counter:
        loss = model(x).pow(2).sum()
    loss.backward()
    return counter.stats()


def test_toy_model_exact_bytes_by_hand():
    torch.manual_seed(0)
    model, x = Toy(), torch.randn(10, 8)
    stats = _count(model, x, exclude=[x])
    # GELU keeps its input (fc1's output, 10×16), fc2 keeps its input (GELU's output, 10×16),
    # pow keeps the model output (10×4). fc1's input x is a model input, weights are parameters.
    assert stats.by_kind == {**dict.fromkeys(KINDS, 0), "linear_inputs": 10 * 16 * F32,
                             "other": 10 * 16 * F32 + 10 * 4 * F32}
    assert stats.total_bytes == 1440 and stats.storages == 3
    assert stats.by_module == {"act": 640, "fc2": 640, "(outside modules)": 160}


def test_model_inputs_count_unless_excluded():
    torch.manual_seed(0)
    model, x = Toy(), torch.randn(10, 8)
    stats = _count(model, x, exclude=[])
    assert stats.total_bytes == 1440 + 10 * 8 * F32
    assert stats.by_kind["linear_inputs"] == (10 * 16 + 10 * 8) * F32


def test_randomized_toy_model_bytes_by_hand():
    torch.manual_seed(0)
    model, x = Toy(), torch.randn(10, 8)
    convert(model, 0.5, sketch="countsketch")
    stats = _count(model, x, exclude=[x])
    # k = 5 of 10 rows: fc1 keeps 5×8 (a new tensor, unlike x), fc2 keeps 5×16
    assert stats.by_kind["sketches"] == (5 * 8 + 5 * 16) * F32
    assert stats.by_kind["linear_inputs"] == 0
    assert stats.by_kind["other"] == (10 * 16 + 10 * 4) * F32
    assert stats.total_bytes == 1280


def test_storage_counted_once_for_views():
    h = torch.randn(4, 4, requires_grad=True)
    with SavedTensorCounter() as counter:
        base = h * 1  # mul by a scalar saves nothing
        out = base[:2] * base[2:]  # saves two views of one storage
    out.sum().backward()
    assert counter.stats().total_bytes == 16 * F32 and counter.stats().storages == 1


def test_linear_input_also_saved_elsewhere_is_shared():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))  # ReLU keeps its output
    x = torch.randn(3, 4)
    stats = _count(model, x, exclude=[x])
    assert stats.by_kind["linear_inputs_shared"] == 3 * 4 * F32
    assert stats.by_kind["linear_inputs"] == 0


def test_parameters_and_buffers_excluded():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    x = torch.randn(6, 4)
    stats = _count(model, x, exclude=[x])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert stats.total_bytes > 0
    # BatchNorm keeps its input (6×4), its saved mean and inverse std (4 + 4), and pow its output
    assert stats.total_bytes == (6 * 4 + 4 + 4 + 6 * 4) * F32
    assert params  # the weights of both layers are saved by autograd but never counted


def test_fold_layer_indices():
    assert fold_layer_indices("roberta.encoder.layer.11.attention.self.query") == \
        "roberta.encoder.layer.*.attention.self.query"
    assert fold_layer_indices("layers.3") == "layers.*"
    assert fold_layer_indices("fc1") == "fc1"


def test_nvml_reports_unavailable_with_reason_on_cpu():
    info = nvml_info(torch.device("cuda"))  # no GPU here: must not crash
    if not info["available"]:
        assert info["reason"]
    with NvmlSampler(torch.device("cpu")) as sampler:
        pass
    result = sampler.result()
    assert result["available"] is False and "cpu" in result["reason"]


def test_summarize_times():
    assert summarize_times([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "samples": [3.0, 1.0, 2.0]}
    assert summarize_times([])["median"] is None


@requires_cuda
def test_cuda_phases_and_nvml_on_gpu():
    device = torch.device("cuda")
    model = nn.Linear(1024, 1024).to(device)
    x = torch.randn(4096, 1024, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def backward_and_step(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with NvmlSampler(device) as sampler:
        result = cuda_step_memory(lambda: model(x).square().mean(), backward_and_step, device)
    assert result["forward_growth_bytes"] >= 4096 * 1024 * F32  # the output kept for square()
    assert result["peak_allocated_bytes"] >= result["resting_allocated_bytes"]
    nvml = sampler.result()
    if nvml["available"]:
        assert nvml["peak_used_bytes"] > 0 and nvml["samples"] >= 1


def test_a_forward_that_is_never_backwarded_is_freed():
    """The pack hook must not tie an output into its own grad_fn: measuring bytes without a
    backward (the budget search does) would otherwise leak every activation."""
    import gc
    import weakref

    model = Toy()
    kept = []
    model.act.register_forward_hook(lambda m, i, o: kept.append(weakref.ref(o)))
    x = torch.randn(10, 8)
    with SavedTensorCounter(model, exclude=[x]):
        loss = model(x).pow(2).sum()
    del loss
    gc.collect()
    assert kept[0]() is None


def test_autocast_sketch_shaped_like_the_weight_is_not_a_weight_copy():
    """k × d_in can equal the weight's shape (here k = d_out = 8): judged by history, not shape."""
    from randbp_cli import RandomizedLinear

    layer = RandomizedLinear(6, 8, rho=0.5, sketch="gaussian")
    x = torch.randn(16, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), SavedTensorCounter(layer, exclude=[x]) as counter:
        out = layer(x)
    out.float().sum().backward()
    stats = counter.stats()
    assert stats.by_kind["sketches"] == 8 * 6 * 2  # the bf16 sketch, (k, d_in) = (8, 6)
    assert stats.by_kind["weight_copies"] == 8 * 6 * 2  # and, separately, the bf16 weight


class RMSNorm(nn.Module):
    def forward(self, x):
        return x * x.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()


class ToyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)

    def forward(self, x):
        return (self.q(x) @ x.T).softmax(-1) @ x  # softmax keeps its output (10×10)


class ToyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down(self.act_fn(self.gate(x)) * self.up(x))


class ToyEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return (x * self.scale).sin()  # sin keeps its input (10×8); mul keeps x and the parameter


class ToyLMHeadModel(nn.Module):
    """Named like transformers' blocks: an embedding, a decoder layer (norm, attention, norm,
    SwiGLU MLP), an LM head, and the loss in the top model's own forward, as `...ForCausalLM`
    computes it."""

    def __init__(self):
        super().__init__()
        self.config = object()  # a transformers model: `config` and a `base_model` below it
        self.base_model = nn.ModuleDict({"embed": ToyEmbedding(), "norm1": RMSNorm(), "attn": ToyAttention(),
                                         "norm2": RMSNorm(), "mlp": ToyMLP()})
        self.lm_head = nn.Linear(8, 12, bias=False)

    def forward(self, x, labels):
        b = self.base_model
        h = b["embed"](x)
        h = h + b["attn"](b["norm1"](h))
        h = h + b["mlp"](b["norm2"](h))
        return nn.functional.cross_entropy(self.lm_head(h), labels)


def test_other_bytes_by_part_of_the_model():
    """What no linear layer keeps is filed by the block that saved it: norms, attention, mlp,
    logits (the loss over them, in the head model's own forward) and other; counted by hand."""
    torch.manual_seed(0)
    model, x, labels = ToyLMHeadModel(), torch.randn(10, 8), torch.randint(0, 12, (10,))
    with SavedTensorCounter(model, exclude=[x, labels]) as counter:
        loss = model(x, labels)
    loss.backward()
    stats = counter.stats()
    rows = lambda width: 10 * width * F32  # noqa: E731
    assert stats.by_kind == {
        **dict.fromkeys(KINDS, 0),
        "other": rows(8),  # the embedding's sin keeps x * scale
        "norms": 2 * (rows(8) + rows(1)),  # each RMSNorm: pow and mul keep its input, mul the rsqrt
        # the score matmul keeps q's output, the softmax its output (10×10); the matmuls also keep
        # norm1's output, which q keeps too: linear_inputs_shared
        "attention": rows(8) + rows(10),
        "linear_inputs_shared": rows(8),
        "mlp": 3 * rows(16),  # SwiGLU: SiLU keeps the gate, the product keeps SiLU(gate) and up
        "linear_inputs": rows(8) + rows(16) + rows(8),  # gate/up's input, down's, lm_head's
        "logits": rows(12) + F32,  # cross-entropy: log-softmax of the logits, nll's total weight
    }
    assert stats.total_bytes == sum(stats.by_kind.values())


def test_saver_kinds_from_module_attributes_and_tagged_tensors():
    """Activation savers file their bytes under kinds of their own; a declared kind with nothing
    saved shows as 0; the built-in kinds keep their meaning."""
    from randbp_cli.measure.memory import SAVED_KIND_ATTR

    class Saver(nn.Module):
        saved_kind = "toy_codes"

        def forward(self, x):
            return x.sin()  # sin keeps its input: filed under the module's kind

    class Quiet(nn.Module):
        saved_kind = "toy_seeds"

        def forward(self, x):
            return x * 2  # a scalar multiply keeps nothing

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.saver, self.quiet = nn.Linear(8, 8), Saver(), Quiet()

        def forward(self, x):
            h = self.quiet(self.saver(self.fc(x)))
            tagged = h + 1
            setattr(tagged, SAVED_KIND_ATTR, "toy_probs")
            return tagged.cos()  # cos keeps its (tagged) input

    x = torch.randn(10, 8)
    stats = _count(Model(), x, exclude=[x])
    assert stats.by_kind == {**dict.fromkeys(KINDS, 0), "other": 10 * 8 * F32,  # pow in _count keeps the output
                             "toy_codes": 10 * 8 * F32, "toy_probs": 10 * 8 * F32, "toy_seeds": 0}
