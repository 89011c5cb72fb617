"""LocalTransport: run Commands on this machine, with no shell in between."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from kpipe.commands import Command, CommandResult
from kpipe.errors import CommandTimeout, TransportError


class LocalTransport:
    """The `local` host: argv straight to execve; sudo only when not root."""

    def __init__(self, name: str = "local", default_timeout: float | None = None):
        self.name = name
        self.default_timeout = default_timeout

    def run(self, cmd: Command) -> CommandResult:
        """Run one command here; a missing program is exit status 127, as a shell reports it."""
        argv = list(cmd.argv)
        if cmd.sudo and os.geteuid() != 0:
            argv = ["sudo", "-n", "--", *argv]
        env = None
        if cmd.env:
            env = dict(os.environ)
            env.update(dict(cmd.env))
        timeout = cmd.timeout if cmd.timeout is not None else self.default_timeout
        start = time.monotonic()
        try:
            proc = subprocess.run(
                argv, input=cmd.stdin, capture_output=True, timeout=timeout, env=env,
                stdin=None if cmd.stdin is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise CommandTimeout(f"{self.name}: {cmd.label or cmd.display()} timed out after {timeout:g} s",
                                 host=self.name) from None
        except FileNotFoundError:
            return CommandResult(self.name, cmd, 127, "", f"{argv[0]}: command not found",
                                 time.monotonic() - start)
        except OSError as e:
            raise TransportError(f"{self.name}: cannot run {argv[0]}: {e.strerror}", host=self.name) from None
        return CommandResult(
            host=self.name, command=cmd, exit_status=proc.returncode,
            stdout=proc.stdout.decode("utf-8", "replace"), stderr=proc.stderr.decode("utf-8", "replace"),
            duration=time.monotonic() - start,
        )

    def put(self, local: Path, remote: str) -> None:
        """Copy a file to a path on this machine (~ expanded, folders created)."""
        dest = Path(os.path.expanduser(remote))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest)

    def get(self, remote: str, local: Path) -> None:
        """Copy a file of this machine to `local`; TransportError when it does not exist."""
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(os.path.expanduser(remote), local)
        except FileNotFoundError:
            raise TransportError(f"{self.name}: {remote} does not exist", host=self.name) from None

    def close(self) -> None:
        """Nothing to release: there is no connection."""

    def __enter__(self) -> LocalTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
