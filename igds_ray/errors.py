"""Exceptions raised before compute, each naming the file, column, key or value at fault."""

from __future__ import annotations


class IGDSError(Exception):
    """Base class of every error igds-ray raises on purpose."""


class ConfigError(IGDSError, ValueError):
    """A config key, value or combination is invalid (names the key)."""


class PoolError(IGDSError, ValueError):
    """A data pool cannot be read as asked (names the file or column)."""


class ModelSAEMismatch(IGDSError, ValueError):
    """The model, the SAE and the requested features do not fit together."""


class StageOutputError(IGDSError, RuntimeError):
    """A stage directory is missing, incomplete or in use."""


class RunLocked(StageOutputError):
    """Another run holds the lock of this run or stage directory (names the directory and the holder)."""
