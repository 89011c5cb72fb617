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
on top of it (measured: ~19 ms for PyYAML, ~54 ms for the vendored copy with it). And since invoke only
calls it when such a file exists (/etc/fabric.yaml, ~/.fabric.yml, ...), what it is given is a stand-in
whose `safe_load` imports PyYAML on its first call: a command that reads no YAML of its own (`fleet
facts` with a warm selection cache) does not pay ~13 ms of PyYAML's import (yaml.reader compiles its
regular expressions at import) at every start.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def _real_mock(*args: Any, **kwargs: Any) -> Any:
    """unittest.mock.Mock(*args, **kwargs), with unittest.mock imported on this first use."""
    from unittest import mock  # the real module: the stand-in left sys.modules once invoke was imported

    return mock.Mock(*args, **kwargs)


def _yaml_safe_load(stream: Any) -> Any:
    """yaml.safe_load(stream), with PyYAML imported on this first use (invoke's config files)."""
    import yaml

    return yaml.safe_load(stream)


def _lazy_yaml() -> types.ModuleType | None:
    """A stand-in for PyYAML holding the one function invoke calls, or None without PyYAML (invoke's own copy)."""
    import importlib.util

    if "yaml" not in sys.modules and importlib.util.find_spec("yaml") is None:
        return None
    stand_in = types.ModuleType("yaml", "kpipe.transport.sshlibs: PyYAML's safe_load, imported on first use")
    stand_in.safe_load = _yaml_safe_load  # type: ignore[attr-defined]
    return stand_in


def import_ssh_libraries() -> None:
    """Import invoke (and so paramiko and Fabric can be imported) without loading unittest.mock and asyncio."""
    if "invoke" in sys.modules or "unittest.mock" in sys.modules:
        return
    stand_in = types.ModuleType("unittest.mock", "kpipe.transport.sshlibs: unittest.mock, loaded on first use")
    stand_in.Mock = _real_mock  # type: ignore[attr-defined]
    lent: dict[str, types.ModuleType] = {"unittest.mock": stand_in}
    if "invoke.vendor.yaml" not in sys.modules:
        yaml = sys.modules.get("yaml") or _lazy_yaml()  # None: no PyYAML here, invoke uses its vendored copy
        if yaml is not None:
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
