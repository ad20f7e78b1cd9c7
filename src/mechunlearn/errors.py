"""Error types. Every problem caused by user input raises a subclass of ``MechUnlearnError``,
so the CLI can print one clear line and exit non-zero instead of a traceback."""


class MechUnlearnError(Exception):
    """Base class for errors the user can fix (bad input, missing package, unknown name)."""


class ConfigError(MechUnlearnError):
    """A configuration value is invalid or unknown."""


class DataError(MechUnlearnError):
    """A data file or record is missing, malformed or empty."""


class ModelNotFoundError(MechUnlearnError):
    """A model specification names nothing that can be loaded."""


class MissingPackageError(MechUnlearnError):
    """An optional package needed for this operation is not installed."""


class TokenizationError(MechUnlearnError):
    """Text does not tokenize as a format requires (e.g. an answer is not a single token)."""


class SiteError(MechUnlearnError):
    """A hook site or component name is invalid for this model."""
