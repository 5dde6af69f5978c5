"""User-facing errors: each becomes one line on stderr and exit code 2 in the CLI."""

from __future__ import annotations


class BnprobeError(Exception):
    """A problem the user can fix (bad config, unknown model, wrong file); never a bug."""


class ConfigError(BnprobeError):
    """The config file or a CLI option is invalid."""


class ModelError(BnprobeError):
    """A model cannot be built, loaded or run on the data."""


class DataError(BnprobeError):
    """A data source is missing or malformed."""


class StoreError(BnprobeError):
    """An HDF5 file is missing, not a bnprobe file, truncated, or would be overwritten."""


class SurgeryError(BnprobeError):
    """BatchNorm surgery cannot be planned on this model."""
