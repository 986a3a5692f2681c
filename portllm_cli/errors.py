"""Every failure portllm can judge becomes a PortllmError with an exit code and an optional hint.

Exit codes (documented in the README):
    0   success
    1   failure (bad input, missing file, I/O error, anything not listed below)
    2   usage error (bad flag or argument)
    3   patch and model are incompatible
    4   integrity failure (hash mismatch, NaN/Inf in a patch, tampered or corrupt file)
    130 interrupted (Ctrl-C, SIGTERM)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INCOMPATIBLE = 3
EXIT_INTEGRITY = 4
EXIT_INTERRUPTED = 130

MAX_MESSAGE_CHARS = 2000


class PortllmError(Exception):
    """Base class: a one-line message, an exit code and an optional hint naming what to do next."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        # Messages echo names taken from untrusted files; a hostile one must not flood the terminal.
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(PortllmError):
    """A flag or argument is wrong in a way the parser could not see (e.g. --limit 0)."""

    exit_code = EXIT_USAGE


class NotFoundError(PortllmError):
    """A file, directory, model, patch, repo or revision does not exist."""


class InvalidInputError(PortllmError):
    """An input exists but is malformed: bad JSON, truncated safetensors, missing fields."""


class UnsupportedError(PortllmError):
    """A valid input that portllm does not handle (e.g. DoRA adapters)."""


class IncompatibleError(PortllmError):
    """A patch does not fit a model: architecture, missing module or shape mismatch."""

    exit_code = EXIT_INCOMPATIBLE


class IntegrityError(PortllmError):
    """A file does not match its manifest, or holds NaN/Inf, or lies about its own layout."""

    exit_code = EXIT_INTEGRITY


class OutputExistsError(PortllmError):
    """The output path exists and --overwrite was not given, or is otherwise unusable."""


class NoSpaceError(PortllmError):
    """The disk filled up (ENOSPC/EDQUOT) while writing; the partial output was removed."""


class UnsafeInputError(PortllmError):
    """Refused for safety: pickle weights without --allow-pickle, path traversal, remote code."""


class HubError(PortllmError):
    """A Hugging Face Hub request failed (auth, not found, network)."""


class Interrupted(PortllmError):
    """The run was interrupted; any partial output was removed."""

    exit_code = EXIT_INTERRUPTED
