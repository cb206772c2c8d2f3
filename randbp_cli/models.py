"""Where models come from: a local directory, the Hugging Face cache or Hub, or a built-in config.

`load_model(name)` resolves, in this order:
  1. a local directory: with weights -> pretrained; with only `config.json` -> random init;
  2. the Hugging Face cache (no network);
  3. the Hub, when it is reachable (a quick connection check first, so an offline machine
     does not sit through the Hub client's retries);
  4. a built-in architecture (`configs/*.json`: `roberta-base`, `roberta-tiny`) with random
     weights. Memory and time do not depend on weight values, and the result says which
     weights it was (`weights`: "pretrained" or "random-init") and why.
Anything else is a `ModelNotFoundError` that says how to supply the model.

`save_model` is the way back out: a fine-tuned model as a safetensors checkpoint, with plain
`nn.Linear` layers again, written to a temp directory and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .convert import restore
from .errors import ConfigError, ModelNotFoundError, OutputError

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
        }


def hub_reachable(timeout_s: float = 1.5) -> bool:
    """True when the Hub's host accepts a TCP connection (and offline mode is not set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _auto_class(task: str):
    import transformers

    classes = {"sequence-classification": transformers.AutoModelForSequenceClassification}
    return classes[task]


def _model_kwargs(num_labels: int, attn_implementation: str | None, dtype: torch.dtype | None) -> dict:
    kwargs: dict = {"num_labels": num_labels}
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


def _from_config(config_source, num_labels, attn_implementation, dtype, seed):
    from transformers import AutoConfig

    kwargs = _model_kwargs(num_labels, attn_implementation, None)
    try:
        config = AutoConfig.from_pretrained(str(config_source), **{k: v for k, v in kwargs.items()
                                                                   if k != "attn_implementation"})
        if attn_implementation:
            config._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same random init for every run with the same seed
            model = _auto_class("sequence-classification").from_config(config)
    except _LOAD_ERRORS as err:
        raise _unusable(str(config_source), err) from None
    return model.to(dtype) if dtype is not None else model


def load_model(name: str, *, num_labels: int = 2, attn_implementation: str | None = None,
               dtype: torch.dtype | None = None, offline: bool = False, seed: int = 0) -> LoadedModel:
    """A sequence-classification model by name, directory or built-in config (see module doc)."""
    if num_labels < 1:
        raise ConfigError(f"num_labels must be >= 1 (got {num_labels})")
    auto = _auto_class("sequence-classification")
    kwargs = _model_kwargs(num_labels, attn_implementation, dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {str(path)!r} has no config.json: point --model "
                                     "at a checkpoint directory or a directory holding a config.json")
        if any((path / f).is_file() for f in WEIGHT_FILES):
            try:
                model = auto.from_pretrained(str(path), **kwargs)
            except _LOAD_ERRORS as err:
                raise _unusable(str(path), err) from None
            return LoadedModel(model, str(path), "local", "pretrained", "checkpoint loaded from a local directory")
        model = _from_config(path / "config.json", num_labels, attn_implementation, dtype, seed)
        return LoadedModel(model, str(path), "local-config", "random-init",
                           "the directory holds only a config.json: random weights")
    if path.suffix == ".json" and path.is_file():
        model = _from_config(path, num_labels, attn_implementation, dtype, seed)
        return LoadedModel(model, str(path), "local-config", "random-init", "built from a config file: random weights")
    try:  # the Hugging Face cache, without touching the network
        model = auto.from_pretrained(name, local_files_only=True, **kwargs)
        return LoadedModel(model, name, "hf-cache", "pretrained", "checkpoint from the Hugging Face cache")
    except _LOAD_ERRORS:
        pass
    if not offline and hub_reachable():
        try:
            model = auto.from_pretrained(name, **kwargs)
            return LoadedModel(model, name, "hub", "pretrained", "checkpoint downloaded from the Hugging Face Hub")
        except _LOAD_ERRORS as err:
            if builtin_config_path(name) is None:
                raise _unusable(name, err) from None
    config_path = builtin_config_path(name)
    if config_path is not None:
        model = _from_config(config_path, num_labels, attn_implementation, dtype, seed)
        return LoadedModel(model, name, "builtin-config", "random-init",
                           "no checkpoint in the cache and the Hub is unreachable: the built-in "
                           "architecture with random weights")
    raise ModelNotFoundError(
        f"unknown model {name!r}: it is not a local directory, not in the Hugging Face cache, and the "
        f"Hub is unreachable; use a built-in architecture ({', '.join(builtin_models())}) or a local "
        "checkpoint directory"
    )


def max_sequence_length(model: nn.Module) -> int:
    """Longest input the model's position embeddings allow (RoBERTa offsets by pad_token_id + 1)."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return 1 << 30
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer"):
        return positions - (config.pad_token_id or 0) - 1
    return positions


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
