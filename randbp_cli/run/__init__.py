"""Running a method: the --device/--dtype parser (devices.py), a method as a value (methods.py),
each command's options resolved once into a frozen plan (plans.py), batches from a plan
(batches.py), torchrun/DDP (distributed.py), and the one engine that applies a method, trains a
step, probes memory and times (engine.py). Imports everything below; never a command.
"""
