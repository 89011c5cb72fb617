"""Forge every kernel the tests use, side by side, before the tests ask for them one at a time.

    python3 tests/forge_prewarm.py        # .ci/run starts it in the background beside pytest

On a machine that has never forged, the fixtures (tests/forge_support.py, arm64_support.py,
test_klp_real.py) would build the three kernels one after another, each when its first test runs,
and the suite would wait on each build. Started together at the beginning, the builds overlap the
tests that need no forged kernel and each other's downloads and single-threaded steps (mmdebstrap,
unpacking, olddefconfig). A fixture that asks for a kernel still being forged waits on that
kernel's lock (kpipe/lab/forge.py) and then finds it in the cache; a build that failed here is
built again by the fixture, which reports its error. On a warm cache each forge is a cache hit.

Each forge is `python3 -m kpipe lab forge`, the command users run (it builds at nice 10).
Exit status: 0 when every forge ended well, 1 otherwise (CI does not depend on it; the fixtures do
the checking).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forge_support import FORGES  # noqa: E402  (after the path insert)


def forge_argv(source: str, arch: str) -> list[str]:
    return [sys.executable, "-m", "kpipe", "lab", "forge", "--source", source, "--arch", arch]


def main() -> int:
    started = time.monotonic()
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    for source, arch in dict.fromkeys(FORGES):  # the same (source, arch) twice is one forge
        label = f"{source} {arch}"
        print(f"prewarm: forging {label}", flush=True)
        procs.append((label, subprocess.Popen(forge_argv(source, arch), stdin=subprocess.DEVNULL,
                                                start_new_session=True)))

    def stop(signum: int, frame: FrameType | None) -> None:
        # CI ended early: end the forges this script started, each with its make and gcc (its own
        # process group, from its PID); an interrupted forge leaves a folder without forge.json,
        # which the next forge rebuilds.
        for _, p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass  # that forge's group ended between poll() and here
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    failed = 0
    for label, p in procs:
        rc = p.wait()
        failed += rc != 0
        print(f"prewarm: {label}: exit {rc} at {time.monotonic() - started:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
