"""The project's error hierarchy: every error a user should read, and nothing else.

Each message states what was received, what was expected, and how to fix it. The CLIs turn a
``CairError`` into one line on stderr and exit code 2; any other exception is a bug.
"""


class CairError(Exception):
    """Base of every error raised for a person to read."""


class InvalidInputError(CairError):
    """An argument or input file the caller gave is out of range, malformed or unknown.

    ``field`` names the parameter at fault where there is one (``"steps"``, ``"prompt"``...), so
    that a service can point its client at it without parsing the message.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ManifestError(CairError):
    """An engine folder or its manifest is missing, unsupported, incomplete or tampered with."""


class ShapeError(CairError):
    """A tensor's shape or dtype is outside what the graphs declared in the manifest accept."""


class EngineMismatchError(CairError):
    """An engine was built for another backend version, GPU or precision than the one at hand."""


class MissingDependencyError(CairError):
    """An optional package needed for the requested feature is not installed."""


class ValidationError(CairError):
    """An exported graph does not compute what the source model computes, within tolerance."""


class NonFiniteResultError(CairError):
    """A generation produced NaN or infinite values (an overflow in the model): no image is made of them."""


class EngineClosedError(CairError):
    """An engine or pipeline was used after ``close()``."""
