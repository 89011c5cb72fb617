"""The real-kernel lab: disposable qemu VMs of a target kernel (lab.md).

The re-exports below load on first use (PEP 562): `from kpipe.lab.arch import ...` (the builders' cross-make
arguments) must not pay for the VM machinery of kpipe.lab.lab (initramfs, userland, the ELF reader) nor the
kernel fetcher; `from kpipe.lab import Lab` still works for callers (tests/test_startup_budget.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kpipe.lab.kernel import (
        KernelImage,
        discover_debian_release,
        fetch_debian_kernel,
        resolve_kernel,
        user_kernel,
    )
    from kpipe.lab.lab import Lab, LabConfig, LabState, workspace_lab

__all__ = ["KernelImage", "Lab", "LabConfig", "LabState", "discover_debian_release", "fetch_debian_kernel",
           "resolve_kernel", "user_kernel", "workspace_lab"]

_FROM_KERNEL = frozenset({"KernelImage", "discover_debian_release", "fetch_debian_kernel", "resolve_kernel",
                          "user_kernel"})
_FROM_LAB = frozenset({"Lab", "LabConfig", "LabState", "workspace_lab"})


def __getattr__(name: str) -> Any:
    """The re-exported names, imported from their modules when first asked for (then kept as attributes)."""
    if name in _FROM_KERNEL:
        from kpipe.lab import kernel

        value = getattr(kernel, name)
    elif name in _FROM_LAB:
        from kpipe.lab import lab

        value = getattr(lab, name)
    else:
        # also how `from kpipe.lab import vm` finds a submodule not imported yet: the import system then loads it
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
