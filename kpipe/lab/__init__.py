"""The real-kernel lab: disposable qemu VMs of a target kernel (lab.md)."""

from kpipe.lab.kernel import KernelImage, discover_debian_release, fetch_debian_kernel, resolve_kernel, user_kernel
from kpipe.lab.lab import Lab, LabConfig, LabState, workspace_lab

__all__ = ["KernelImage", "Lab", "LabConfig", "LabState", "discover_debian_release", "fetch_debian_kernel",
           "resolve_kernel", "user_kernel", "workspace_lab"]
