"""Kernel module ELF reading, signatures and kernel symbol indexes (the only user of pyelftools)."""

from kpipe.elf.reader import ModuleFormatError, ModuleInfo, parse_module, read_module

__all__ = ["ModuleFormatError", "ModuleInfo", "parse_module", "read_module"]
