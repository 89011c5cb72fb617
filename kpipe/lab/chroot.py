"""Run a command in a Debian chroot inside a private mount namespace.

`kpipe-chroot` mounts are made in a namespace of their own (`unshare --mount
--propagation private`), so they vanish with its last process: a killed build
or sshd never leaves /proc, /dev or a bind mount behind on the host. Bind
mounts keep host paths identical inside the chroot (a forged kernel's tree is
at the same absolute path for the host, the build and kpatch-build).

Usage (as unshare's child): python3 -m kpipe.lab.chroot ROOT [--bind PATH]... -- ARGV...
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def enter_argv(root: Path, argv: list[str], binds: tuple[Path, ...] = (), *, nice: int = 0) -> list[str]:
    """The host argv that runs argv inside root with /proc, /dev and binds mounted privately."""
    cmd: list[str] = []
    if nice:
        cmd += ["nice", "-n", str(nice)]
    cmd += ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m", "kpipe.lab.chroot",
            str(root)]
    for b in binds:
        cmd += ["--bind", str(b)]
    return cmd + ["--", *argv]


def parse_args(args: list[str]) -> tuple[Path, list[Path], list[str]]:
    """ROOT [--bind PATH]... -- ARGV... into (root, binds, argv)."""
    if "--" not in args or not args or args[0] == "--":
        raise ValueError("usage: python3 -m kpipe.lab.chroot ROOT [--bind PATH]... -- ARGV...")
    sep = args.index("--")
    head, argv = args[:sep], args[sep + 1:]
    root, rest = Path(head[0]), head[1:]
    binds: list[Path] = []
    while rest:
        if rest[0] != "--bind" or len(rest) < 2:
            raise ValueError(f"unexpected argument {rest[0]!r}")
        binds.append(Path(rest[1]))
        rest = rest[2:]
    if not argv:
        raise ValueError("no command to run")
    return root, binds, argv


def _mount(*argv: str) -> None:
    r = subprocess.run(["mount", *argv], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"kpipe-chroot: mount {' '.join(argv)}: {r.stderr.strip()}")


def main(args: list[str]) -> None:
    """Mount, chroot and exec (never returns on success)."""
    try:
        root, binds, argv = parse_args(args)
    except ValueError as e:
        raise SystemExit(f"kpipe-chroot: {e}") from None
    root = root.resolve()
    # Only in this namespace: the host's mount table never sees these.
    _mount("-t", "proc", "proc", str(root / "proc"))
    _mount("--rbind", "/dev", str(root / "dev"))
    for b in binds:
        target = root / str(b.resolve()).lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        _mount("--bind", str(b.resolve()), str(target))
    os.chroot(root)
    os.chdir("/")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", "TERM": "dumb"}
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise SystemExit(f"kpipe-chroot: {argv[0]}: {e.strerror}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
