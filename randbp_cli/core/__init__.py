"""The method itself, usable from any training script: what a sketch is and every sketch (sketch.py,
row_sampling.py, sketches.py), the sketches as torch.library ops (ops.py), the autograd Function and
`RandomizedLinear` (layers.py), one sketch for the layers that read one tensor (sharing.py), second
order (second_order.py), and the converter with the one module swap (convert.py, swap.py).
Imports only kernels/ and the package root (errors, options); no transformers, no UI.
"""
