"""The commands as library calls, each from a config or plan to a typed report: `profile`
(profile.py), `finetune` (finetune.py), `variance` (variance.py) and the memory gate `check`
(check.py). No UI: progress and Ctrl-C come in as callbacks. Imports everything below.
"""
