"""What is measured, and how: saved-tensor bytes by kind and module (memory.py; exact and
deterministic), what the device reports (meters.py: step time, the CUDA allocator, NVML), the
environment a report records (environment.py) and the gradient-variance estimators
(variance.py). Imports core/ (to tell a sketch from a linear input) and nothing above it.
"""
