"""The balanced sketch's S, computed from (seed, row index) instead of stored: the torch reference
(balanced.py) and the fused Triton kernel held to it (balanced_triton.py; CUDA, or the CPU under
TRITON_INTERPRET=1). Imports nothing else of randbp: the kernels know nothing of layers or models.
"""
