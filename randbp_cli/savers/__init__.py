"""Exact (and one approximate) activation savers beyond the linear layers: seed dropout
(dropout.py), eager attention that keeps the softmax once (attention.py), few-bit GELU
(gelu.py), and the registry that applies and undoes them (registry.py: one `Saver` class per
saver, swapped in by core/swap.py). Imports core/ and measure/.
"""
