"""The kernel's taint flags: the one table of bits and letters (pure; no imports).

Documentation/admin-guide/tainted-kernels.rst lists them; /proc/sys/kernel/tainted holds the mask.
Facts, the desired state, kpipe.toml's [audit] allowed_taint and the reports all use this table.
"""

from __future__ import annotations

from collections.abc import Iterable

# bit 0 = P ... bit 19 = J, in bit order
TAINT_LETTERS = "PFSRMBUDAWCIOELKXTNJ"
_LETTER_BITS = {letter: bit for bit, letter in enumerate(TAINT_LETTERS)}

TAINT_OOT = 1 << 12  # O: an out-of-tree module was loaded (every live patch is one)
TAINT_UNSIGNED = 1 << 13  # E: an unsigned module, or one signed by a key the kernel does not trust
TAINT_LIVEPATCH = 1 << 15  # K: a live patch was loaded since boot (stays set after unload)
# What loading a live patch sets: not a finding unless the user says otherwise.
DEFAULT_ALLOWED_TAINT = TAINT_OOT | TAINT_UNSIGNED | TAINT_LIVEPATCH


def taint_letters(mask: int) -> str:
    """Taint bits as the kernel's letters in bit order, e.g. 45056 -> 'OEK'; a bit without a letter as bitN."""
    return "".join(TAINT_LETTERS[b] if b < len(TAINT_LETTERS) else f"bit{b}"
                   for b in range(mask.bit_length()) if mask >> b & 1)


def taint_mask(letters: Iterable[str]) -> int:
    """The mask for taint letters ('K', 'O'...); ValueError on an unknown letter."""
    mask = 0
    for letter in letters:
        letter = str(letter).strip().upper()
        if letter not in _LETTER_BITS:
            raise ValueError(f"unknown taint letter {letter!r}")
        mask |= 1 << _LETTER_BITS[letter]
    return mask
