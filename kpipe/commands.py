"""Remote actions as data.

A Command holds an argv tuple; it becomes a shell line in exactly one place,
`Command.shell_line()`, through `shlex.join`. When a step needs shell features
(a redirect, a pipe), it uses `Command.script()`: the script text is a constant
written in kpipe's source, and every user-controlled value travels as a
positional parameter ("$1", "$2"...), never inside the script text.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Command:
    """One remote action: argv plus how to run it."""

    argv: tuple[str, ...]
    sudo: bool = False
    timeout: float | None = None  # seconds; None = the transport's default
    secret: bool = False  # argv carries a secret: never print it
    stdin: bytes | None = None
    env: tuple[tuple[str, str], ...] = ()
    label: str = ""  # a short name for progress and journals, e.g. "load"

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("a Command needs at least one argv element")
        for part in self.argv:
            if not isinstance(part, str):
                raise TypeError(f"argv elements must be str, got {type(part).__name__}")
            if "\x00" in part:
                raise ValueError("argv elements cannot contain NUL bytes")

    @classmethod
    def of(cls, *argv: str, **kwargs: object) -> Command:
        """Build a Command from positional argv elements."""
        return cls(argv=tuple(argv), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def script(cls, script: str, *args: str, **kwargs: object) -> Command:
        """A constant sh script run with user values as "$1".. positional parameters."""
        return cls(argv=("sh", "-c", script, "kpipe", *args), **kwargs)  # type: ignore[arg-type]

    def with_timeout(self, timeout: float | None) -> Command:
        return Command(self.argv, self.sudo, timeout, self.secret, self.stdin, self.env, self.label)

    def shell_line(self, *, use_sudo: bool | None = None) -> str:
        """The one place a Command becomes a shell string (quoted once, with shlex.join)."""
        argv: list[str] = []
        if self.env:
            argv += ["env", *(f"{k}={v}" for k, v in self.env)]
        argv += list(self.argv)
        sudo = self.sudo if use_sudo is None else use_sudo
        if sudo:
            argv = ["sudo", "-n", "--", *argv]
        return shlex.join(argv)

    def display(self) -> str:
        """A printable form: the shell line, or *** for secret commands."""
        if self.secret:
            return f"{self.argv[0]} ***"
        return self.shell_line()

    def __repr__(self) -> str:
        return f"Command({self.display()!r}, sudo={self.sudo}, timeout={self.timeout})"


@dataclass
class CommandResult:
    """What one Command did on one host."""

    host: str
    command: Command
    exit_status: int
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0  # seconds
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def summary(self) -> str:
        tail = (self.stderr or self.stdout).strip().splitlines()
        last = tail[-1] if tail else ""
        return f"{self.command.label or self.command.display()} exited {self.exit_status}: {last}"
