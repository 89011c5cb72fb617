"""Transports: how a Command reaches a host (local, SSH through Fabric, Ansible)."""

from kpipe.transport.base import Transport

__all__ = ["Transport"]
