"""randbp: memory-efficient backpropagation through large linear layers (arXiv 2201.13195).

Library:
    from randbp_cli import RandomizedLinear, convert, restore
    model = convert(model, rho=0.1, sketch="countsketch")   # every nn.Linear, same Parameters
    ...train as usual...
    model = restore(model)                                  # back to plain nn.Linear

    model = apply_savers(model, ["dropout", "gelu:2"])      # seed dropout, 2-bit GELU backward
    model = restore_savers(model)

The names are imported when first used, so `import randbp_cli` (and the `randbp` command's
start, `randbp --help`) does not import torch.
"""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(["convert", "converted_names", "describe_conversion", "restore", "select_linears",
                     "skipped_linears"], "core.convert"),
    **dict.fromkeys(["ConfigError", "RandbpError"], "errors"),
    **dict.fromkeys(["RandomizedLinear", "RandomizedLinearFunction", "randomized_linear"], "core.layers"),
    **dict.fromkeys(["SavedTensorCounter", "count_saved_bytes", "live_bytes_after"], "measure.memory"),
    **dict.fromkeys(["apply_savers", "describe_savers", "restore_savers", "saver_names"], "savers.registry"),
    **dict.fromkeys(["Sketch", "get_sketch", "sketch_names", "sketch_rows"], "core.sketches"),
}

__all__ = [
    "ConfigError", "RandbpError", "RandomizedLinear", "RandomizedLinearFunction", "SavedTensorCounter",
    "Sketch", "apply_savers", "convert", "converted_names", "count_saved_bytes", "describe_conversion",
    "describe_savers", "get_sketch", "live_bytes_after", "randomized_linear", "restore", "restore_savers", "saver_names",
    "select_linears", "sketch_names", "sketch_rows", "skipped_linears", "__version__",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

