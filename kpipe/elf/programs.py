"""ELF facts of executables and kernels of any arch, read without running them (the lab's foreign userland)."""

from __future__ import annotations

from pathlib import Path


def elf_needs(path: Path) -> tuple[str | None, list[str]]:
    """(PT_INTERP, DT_NEEDED sonames) of an ELF file; (None, []) for a static one."""
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile
    from elftools.elf.segments import InterpSegment

    with open(path, "rb") as f:
        elf = ELFFile(f)
        interp = None
        for seg in elf.iter_segments():
            if isinstance(seg, InterpSegment):
                interp = seg.get_interp_name()
        needed: list[str] = []
        for sec in elf.iter_sections():
            if isinstance(sec, DynamicSection):
                needed += [str(t.needed) for t in sec.iter_tags()  # type: ignore[attr-defined]
                           if t.entry.d_tag == "DT_NEEDED"]
    return interp, needed


def elf_machine(path: Path) -> str:
    """e_machine of an ELF file as pyelftools names it (EM_AARCH64, EM_X86_64, ...)."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        return str(ELFFile(f)["e_machine"])
