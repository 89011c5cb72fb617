"""paramiko and Fabric, imported without the test helpers invoke drags in.

paramiko.config imports invoke at import time (for ssh_config's `Match exec`), and Fabric is built on
invoke. invoke.context starts with `from unittest.mock import Mock`, which loads unittest and asyncio:
about a third of paramiko's import time, paid by every kpipe command that opens an SSH connection
(`kpipe build` on an SSH build host, fleet facts, rollouts; bench/build_overhead.py). Mock is used by
invoke's MockContext alone, a test double no kpipe path creates.

`import_ssh_libraries()` imports invoke while `unittest.mock` is a stand-in whose Mock loads the real
unittest.mock on its first call; the stand-in leaves sys.modules as soon as invoke is imported, so any
later `import unittest.mock` (tests, a library) gets the real module, and invoke's MockContext still
works. Fabric's own paths (Connection, Config, SFTP, `Match exec` through invoke.run) are untouched:
only when invoke.context binds Mock changes. When unittest.mock or invoke is already loaded, nothing
is swapped.

The same goes for invoke's vendored copy of PyYAML (invoke.vendor.yaml, another ~third of invoke's
import), used for one thing: `yaml.safe_load` of invoke's optional *.yaml config files. invoke itself
falls back to the installed PyYAML when its vendor folder is missing (invoke/util.py, for distribution
packages), and the vendored copy imports the installed PyYAML anyway (for its C loader): so invoke is
given the installed PyYAML, kpipe's own dependency (kpipe.yamlnodes), instead of a second copy of it
on top of it (measured: ~19 ms for PyYAML, ~54 ms for the vendored copy with it).
"""

from __future__ import annotations

import sys
import types
from typing import Any


def _real_mock(*args: Any, **kwargs: Any) -> Any:
    """unittest.mock.Mock(*args, **kwargs), with unittest.mock imported on this first use."""
    from unittest import mock  # the real module: the stand-in left sys.modules once invoke was imported

    return mock.Mock(*args, **kwargs)


def import_ssh_libraries() -> None:
    """Import invoke (and so paramiko and Fabric can be imported) without loading unittest.mock and asyncio."""
    if "invoke" in sys.modules or "unittest.mock" in sys.modules:
        return
    stand_in = types.ModuleType("unittest.mock", "kpipe.transport.sshlibs: unittest.mock, loaded on first use")
    stand_in.Mock = _real_mock  # type: ignore[attr-defined]
    lent: dict[str, types.ModuleType] = {"unittest.mock": stand_in}
    if "invoke.vendor.yaml" not in sys.modules:
        try:
            import yaml
        except ImportError:  # no PyYAML here: invoke uses its vendored copy
            pass
        else:
            lent["invoke.vendor.yaml"] = yaml
    sys.modules.update(lent)
    try:
        import invoke  # noqa: F401  (binds invoke.context.Mock to the stand-in's, invoke.util.yaml to PyYAML)
    except ImportError:  # no invoke: paramiko works without it (no `Match exec`), Fabric would not import
        pass
    finally:
        for name, module in lent.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
