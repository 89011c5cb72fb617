"""Errors a user can cause, each with a documented exit code.

The CLI turns a KpipeError into one line (message + hint) and its exit code;
a traceback is printed only with KPIPE_DEBUG=1.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes; README.md documents them."""

    OK = 0
    FAILURE = 1  # an operation ran and failed (generic)
    USAGE = 2  # bad command-line usage (Typer's own code)
    INVALID = 3  # a module failed validation
    CONFIG = 4  # malformed input: workspace, recipe, inventory, patch path
    NOT_FOUND = 5  # unknown kernel, recipe, artifact, host, rollout
    UNREACHABLE = 6  # a host could not be reached or answered nonsense
    BUILD_FAILED = 7  # the builder ran and failed
    ROLLOUT_HALTED = 8  # a gate failed: the rollout halted (and rolled back)
    PREFLIGHT_FAILED = 9  # the preflight VM refused or failed the module
    LOCKED = 10  # another kpipe holds the rollout or build
    INTERRUPTED = 130


class KpipeError(Exception):
    """An expected failure: one clear line for the user, plus an optional hint."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: str | None = None, exit_code: ExitCode | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class ConfigError(KpipeError):
    """Malformed user input: a file, a field, a value. Message names file:line where known."""

    exit_code = ExitCode.CONFIG


class UsageError(KpipeError):
    """Options that do not go together, or a missing one kpipe checks itself (exit 2, as click's own)."""

    exit_code = ExitCode.USAGE


class NotFoundError(KpipeError):
    exit_code = ExitCode.NOT_FOUND


class TransportError(KpipeError):
    """A host could not be reached, timed out, or broke the connection."""

    exit_code = ExitCode.UNREACHABLE

    def __init__(self, message: str, *, host: str = "", kind: str = "error", hint: str | None = None):
        super().__init__(message, hint=hint)
        self.host = host
        self.kind = kind  # refused | timeout | auth | hostkey | disconnected | error


class CommandTimeout(TransportError):
    def __init__(self, message: str, *, host: str = "", hint: str | None = None):
        super().__init__(message, host=host, kind="timeout", hint=hint)


class BuildFailed(KpipeError):
    exit_code = ExitCode.BUILD_FAILED


class ValidationFailed(KpipeError):
    exit_code = ExitCode.INVALID


class RolloutHalted(KpipeError):
    exit_code = ExitCode.ROLLOUT_HALTED


class PreflightFailed(KpipeError):
    exit_code = ExitCode.PREFLIGHT_FAILED


class Locked(KpipeError):
    exit_code = ExitCode.LOCKED
