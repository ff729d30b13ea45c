"""Errors that end a scan, each carrying the CLI exit code of product.md.

Exit codes (as ModelScan's): 0 clean, 1 infected, 2 error, 3 nothing supported to scan,
4 usage error. An error is a result state, never a silent pass.
"""

EXIT_CLEAN = 0
EXIT_INFECTED = 1
EXIT_ERROR = 2
EXIT_UNSUPPORTED = 3
EXIT_USAGE = 4


class TrojanScanError(Exception):
    """Base class: a one-line, user-facing reason and the exit code it maps to."""

    exit_code = EXIT_ERROR


class DataError(TrojanScanError):
    """Clean data is missing, malformed or does not fit the model."""


class ModelLoadError(TrojanScanError):
    """A model file could not be loaded (corrupt, refused, or inconsistent)."""


class UnsupportedModelError(TrojanScanError):
    """Nothing in the given file is a format trojanscan can scan."""

    exit_code = EXIT_UNSUPPORTED
