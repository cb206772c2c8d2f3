"""Where models come from: a local directory, the Hugging Face cache or Hub, or a built-in config.

`load_model(name)` resolves, in this order:
  1. a local directory: with weights -> pretrained; with only `config.json` -> random init;
  2. the Hugging Face cache (no network);
  3. the Hub, when it is reachable. Whether it is, is found out once per process, before any
     library call that might ask it (`hub_reachable`: a name lookup and one connection, bounded
     in time); when it is not, or with `offline=True`, the whole process switches to the Hub's
     offline mode (`work_offline`), so no later call in huggingface_hub, transformers or datasets
     waits on the network or retries (transformers asks the Hub for a PEFT adapter even under
     `local_files_only=True`), and one line on stderr says so;
  4. a built-in architecture (`configs/*.json`: `roberta-base`, `roberta-tiny`) with random
     weights. Memory and time do not depend on weight values, and the result says which
     weights it was (`weights`: "pretrained" or "random-init") and why.
Anything else is a `ModelNotFoundError` that says how to supply the model. Its config decides the
head (heads.py): an encoder gets a sequence-classification head, a decoder LM keeps its causal-LM
head; a model of any other type (an encoder-decoder such as T5) is a ConfigError before it is
built; from a local directory, `check_model_type` says so before any data is read.

`save_model` is the way back out: a fine-tuned model as a safetensors checkpoint, with plain
`nn.Linear` layers again, written to a temp directory and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..core.convert import restore
from ..errors import ConfigError, ModelNotFoundError, OutputError
from ..savers.registry import check_savers
from .heads import SEQUENCE_CLASSIFICATION, auto_class, head_for

CONFIG_DIR = Path(__file__).parent / "configs"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def builtin_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def builtin_config_path(name: str) -> Path | None:
    path = CONFIG_DIR / f"{name}.json"
    return path if path.is_file() else None


@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    source: str  # "local", "hf-cache", "hub", "local-config", "builtin-config"
    weights: str  # "pretrained" or "random-init"
    note: str
    head: str = SEQUENCE_CLASSIFICATION  # or CAUSAL_LM (heads.py)

    def describe(self) -> dict:
        config = self.model.config
        return {
            "name": self.name,
            "source": self.source,
            "weights": self.weights,
            "note": self.note,
            "model_type": getattr(config, "model_type", None),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            **({"head": self.head} if self.head != SEQUENCE_CLASSIFICATION else {}),
        }


_hub_reachable: bool | None = None  # found out once per process (see hub_reachable)


def hub_reachable(timeout_s: float = 1.5) -> bool:
    """True when the Hub's host (or the proxy the environment names for it) accepts a TCP connection,
    and offline mode is not set. Found out once per process, in at most `timeout_s` (a name lookup
    that hangs included); when the answer is no, the process goes offline (`work_offline`) and one
    line on stderr says so, so nothing later waits on the network or retries."""
    global _hub_reachable
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if _hub_reachable is None:
        why_not = _probe(constants.ENDPOINT, timeout_s)
        _hub_reachable = why_not is None
        if why_not is not None:
            work_offline()
            print(f"note: the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({why_not}): working "
                  "offline (local files, the Hugging Face cache, built-in architectures)", file=sys.stderr, flush=True)
    return _hub_reachable


def _probe(endpoint: str, timeout_s: float) -> str | None:
    """None when `endpoint`'s host, or its proxy, accepts a connection within `timeout_s`; else why not.
    The attempt runs in a daemon thread, so a name lookup that hangs costs `timeout_s`, not the
    resolver's own timeouts."""
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return f"no host name in {endpoint!r}"
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):  # the Hub client goes through it too
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_url.hostname:
            host, port = proxy_url.hostname, proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    answer: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                answer.append(None)
        except OSError as err:
            answer.append(getattr(err, "strerror", None) or str(err) or type(err).__name__)

    thread = threading.Thread(target=attempt, name="randbp-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answer[0] if answer else f"no answer within {timeout_s:g} s"


def work_offline() -> None:
    """Put this process, and the processes it starts, in the Hub's offline mode: huggingface_hub,
    transformers and datasets then read local files only, without a request or a retry."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # what huggingface_hub and transformers (is_offline_mode) read
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:  # (imported later, datasets reads the environment)
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_is_offline_mode"):  # transformers 4.x's own flag
        transformers_hub._is_offline_mode = True


def use_hub(offline: bool = False) -> bool:
    """May this process use the Hub? Not with `offline` (--offline) or when it cannot be reached; either
    way the process is then offline, so no library call waits on the network."""
    if offline:
        work_offline()
        return False
    return hub_reachable()


def no_hub(offline: bool) -> str:
    """Why the Hub is not used: said as the user would recognise it."""
    return "offline mode was asked for (--offline)" if offline else "the Hub is unreachable"


def _model_kwargs(head: str, num_labels: int, attn_implementation: str | None, dtype: torch.dtype | None) -> dict:
    kwargs: dict = {}
    if head == SEQUENCE_CLASSIFICATION:
        kwargs["num_labels"] = num_labels
        if num_labels == 1:
            kwargs["problem_type"] = "regression"
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    return kwargs


# what transformers raises for a config or checkpoint it cannot use (bad JSON, unknown
# model_type, no sequence-classification head, an attention kernel that is not installed)
_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, TypeError)


def _unusable(source: str, err: Exception) -> ModelNotFoundError:
    text = " ".join(str(err).split()) or type(err).__name__
    return ModelNotFoundError(f"cannot build a sequence-classification model from {source!r}: {text[:300]}")


def check_model_type(name: str, wanted: tuple[str, str] | None = None) -> str | None:
    """Refuse an unsupported local or built-in model from its config alone, before anything is built
    or read, and, given `wanted` (the head a run's data trains, and what that data is called), one
    with the other head. Returns the model's head, or None for names that are not local (they are
    checked once loaded)."""
    from transformers import AutoConfig

    path = Path(name).expanduser()
    source = path / "config.json" if path.is_dir() else path if path.suffix == ".json" else builtin_config_path(name)
    if source is None or not Path(source).is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(str(source))
    except _LOAD_ERRORS:
        return None  # load_model says what is wrong with it
    head = head_for(config, name)
    if wanted is not None and head != wanted[0]:
        refuse_head(name, head, wanted[1])
    return head


def model_head(name: str, offline: bool = False) -> str:
    """The head `name` trains with: from its config where one is at hand (local, built in, in the
    Hugging Face cache), else from the model itself, loaded."""
    head = check_model_type(name)
    if head is None:
        cached = _cached_config(name)
        head = head_for(cached, name) if cached is not None else load_model(name, offline=offline).head
    return head


def refuse_head(name: str, head: str, data: str) -> None:
    """A ConfigError: `data` trains models with the other head."""
    if head == SEQUENCE_CLASSIFICATION:
        raise ConfigError(f"{data} is language modelling, for a decoder (gpt2, llama, smollm2-135m, llama-tiny ...); "
                          f"{name!r} is an encoder: train it on a classification task")
    raise ConfigError(f"model {name!r} is a decoder language model and {data} is classification: train a decoder "
                      "on --task synthetic-lm or on your own text (--train-file/--validation-file: a .txt file or "
                      "a text column), or measure it with randbp profile (add --lora RANK for LoRA)")


def check_methods_supported(model: nn.Module, methods) -> None:
    """Refuse, before any run, a method `model` cannot run: activation checkpointing it lacks, or a
    saver with nothing to replace in it (each method's savers planned, nothing swapped)."""
    if any(method.checkpoint for method in methods) and not getattr(model, "supports_gradient_checkpointing", True):
        raise ConfigError(f"--method checkpoint: transformers has no activation checkpointing for "
                          f"{type(model).__name__}; use --method randomized (or exact) with this model")
    for savers in dict.fromkeys(tuple(getattr(method, "savers", ())) for method in methods):
        if savers:
            check_savers(model, savers)


def _config(source: str, **kwargs):
    """A model's config (a ModelNotFoundError when it cannot be read), or None for `if_absent`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except _LOAD_ERRORS as err:
        raise _unusable(source, err) from None


def _from_config(config_source, num_labels, attn_implementation, dtype, seed) -> tuple[nn.Module, str]:
    """A randomly initialised model of the config at `config_source`, and its head."""
    head = head_for(_config(str(config_source)), str(config_source))
    config = _config(str(config_source), **_model_kwargs(head, num_labels, None, None))
    try:
        if attn_implementation:
            config._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same random init for every run with the same seed
            model = auto_class(head).from_config(config)
    except _LOAD_ERRORS as err:
        raise _unusable(str(config_source), err) from None
    return (model.to(dtype) if dtype is not None else model), head


def _pretrained(source: str, head: str, kwargs: dict, **options) -> nn.Module:
    try:
        return auto_class(head).from_pretrained(source, **kwargs, **options)
    except _LOAD_ERRORS as err:
        raise _unusable(source, err) from None


def _cached_config(name: str):
    """The config of `name` in the Hugging Face cache, or None (no network)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except _LOAD_ERRORS:
        return None


def load_model(name: str, *, num_labels: int = 2, attn_implementation: str | None = None,
               dtype: torch.dtype | None = None, offline: bool = False, seed: int = 0) -> LoadedModel:
    """A model by name, directory or built-in config, with the head its type trains with (see the
    module doc); `num_labels` sizes a classification head and is ignored by a causal LM."""
    if num_labels < 1:
        raise ConfigError(f"num_labels must be >= 1 (got {num_labels})")
    check_model_type(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {str(path)!r} has no config.json: point --model "
                                     "at a checkpoint directory or a directory holding a config.json")
        if any((path / f).is_file() for f in WEIGHT_FILES):
            head = head_for(_config(str(path)), str(path))
            model = _pretrained(str(path), head, _model_kwargs(head, num_labels, attn_implementation, dtype))
            return LoadedModel(model, str(path), "local", "pretrained", "checkpoint loaded from a local directory",
                               head)
        model, head = _from_config(path / "config.json", num_labels, attn_implementation, dtype, seed)
        return LoadedModel(model, str(path), "local-config", "random-init",
                           "the directory holds only a config.json: random weights", head)
    if path.suffix == ".json" and path.is_file():
        model, head = _from_config(path, num_labels, attn_implementation, dtype, seed)
        return LoadedModel(model, str(path), "local-config", "random-init", "built from a config file: random weights",
                           head)
    online = use_hub(offline)  # before any call that could ask the Hub (and retry)
    cached = _cached_config(name)  # the Hugging Face cache, without touching the network
    if cached is not None:
        head = head_for(cached, name)
        try:
            model = auto_class(head).from_pretrained(name, local_files_only=True,
                                                     **_model_kwargs(head, num_labels, attn_implementation, dtype))
        except _LOAD_ERRORS:
            model = None  # a config without its weights: the Hub, or the built-in architecture
        if model is not None:
            return LoadedModel(model, name, "hf-cache", "pretrained", "checkpoint from the Hugging Face cache", head)
    if online:
        try:
            head = head_for(_config(name), name)
            model = _pretrained(name, head, _model_kwargs(head, num_labels, attn_implementation, dtype))
            return LoadedModel(model, name, "hub", "pretrained", "checkpoint downloaded from the Hugging Face Hub",
                               head)
        except ModelNotFoundError:
            if builtin_config_path(name) is None:
                raise
    config_path = builtin_config_path(name)
    if config_path is not None:
        model, head = _from_config(config_path, num_labels, attn_implementation, dtype, seed)
        return LoadedModel(model, name, "builtin-config", "random-init",
                           f"no checkpoint in the cache and {no_hub(offline)}: the built-in "
                           "architecture with random weights", head)
    raise ModelNotFoundError(
        f"unknown model {name!r}: it is not a local directory, not in the Hugging Face cache, and "
        f"{no_hub(offline)}; use a built-in architecture ({', '.join(builtin_models())}) or a local "
        "checkpoint directory"
    )


def max_sequence_length(model: nn.Module) -> int:
    """Longest input the model's position embeddings allow. RoBERTa and its kin (embeddings with
    a `padding_idx`: XLM-R, CamemBERT, MPNet, data2vec-text ...) number positions from
    padding_idx + 1, so they hold padding_idx + 1 fewer."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None:
        return 1 << 30
    padding_idx = getattr(getattr(getattr(model, "base_model", None), "embeddings", None), "padding_idx", None)
    return positions - padding_idx - 1 if isinstance(padding_idx, int) else positions


# ---------------------------------------------------------------------------- saving


def check_save_dir(directory: Path) -> None:
    """Fail before training if --save-model cannot be written."""
    parent = directory.expanduser().resolve().parent
    if not parent.is_dir():
        raise OutputError(f"cannot save the model to {str(directory)!r}: {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot save the model to {str(directory)!r}: permission denied")
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"cannot save the model to {str(directory)!r}: it is a file")


def save_model(model, tokenizer, directory: Path) -> None:
    """safetensors checkpoint (plain nn.Linear again), written to a temp dir then renamed."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # what mkdir would give it, not mkdtemp's 0700
    try:
        restore(model).save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = None
        if directory.exists():  # moved aside, not deleted, until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            directory.rename(old / directory.name)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
