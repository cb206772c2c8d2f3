"""randbp: memory-efficient backpropagation through large linear layers (arXiv 2201.13195).

Library:
    from randbp_cli import RandomizedLinear, convert, restore
    model = convert(model, rho=0.1, sketch="countsketch")   # every nn.Linear, same Parameters
    ...train as usual...
    model = restore(model)                                  # back to plain nn.Linear

    model = apply_savers(model, ["dropout", "gelu:2"])      # seed dropout, 2-bit GELU backward
    model = restore_savers(model)
"""

from .convert import convert, converted_names, describe_conversion, restore, select_linears, skipped_linears
from .errors import ConfigError, RandbpError
from .layers import RandomizedLinear, RandomizedLinearFunction, randomized_linear
from .memory import SavedTensorCounter, count_saved_bytes, live_bytes_after
from .savers import apply_savers, describe_savers, restore_savers, saver_names
from .sketches import Sketch, get_sketch, sketch_names, sketch_rows

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "RandbpError", "RandomizedLinear", "RandomizedLinearFunction", "SavedTensorCounter",
    "Sketch", "apply_savers", "convert", "converted_names", "count_saved_bytes", "describe_conversion",
    "describe_savers", "get_sketch", "live_bytes_after", "randomized_linear", "restore", "restore_savers", "saver_names",
    "select_linears", "sketch_names", "sketch_rows", "skipped_linears", "__version__",
]
