"""The errors randbp raises for things a user can fix.

The library never prints and never exits; it raises one of these with a message that names
the setting, the value it saw and what to do instead. Only the CLI (`cli/main.py`) turns them into a single
line on stderr and an exit code (`exit_code`: 2 for usage mistakes, 1 for runtime failures).
"""

from __future__ import annotations


class RandbpError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what the CLI exits with.

    `rank_local`: under torchrun, only this process hit it (so it must speak for itself);
    otherwise every rank raises the same error and rank 0 alone reports it.
    """

    exit_code = 1
    rank_local = False


class ConfigError(RandbpError, ValueError):
    """A bad argument or option value (exit code 2)."""

    exit_code = 2


class ModelNotFoundError(RandbpError):
    """A model that is neither a built-in name, a local directory, nor reachable on the Hub."""

    exit_code = 2


class DeviceError(RandbpError):
    """The requested device does not exist on this machine (exit code 2)."""

    exit_code = 2


class OutputError(RandbpError):
    """A report could not be written where asked (exit code 2)."""

    exit_code = 2


class ReportWriteError(RandbpError):
    """Writing a report failed at the end of a run (disk full, I/O error): exit code 1."""

    exit_code = 1


class DataError(RandbpError):
    """Data that cannot be used as given (missing, unreadable, wrong columns, bad labels): exit 2."""

    exit_code = 2


class DataUnavailableError(RandbpError):
    """No network and no local copy: exit 1, with how to supply the data."""

    exit_code = 1


class ReportError(RandbpError):
    """A report that cannot be used: missing, not JSON, not randbp, wrong schema (exit 2)."""

    exit_code = 2


class SecondOrderError(RandbpError, RuntimeError):
    """A second-order gradient randbp would get wrong (biased, or a missing term): refused (exit 1)."""

    exit_code = 1


class DistributedError(RandbpError):
    """The process group could not be set up (exit code 1)."""

    exit_code = 1
