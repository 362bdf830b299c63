"""Reading ELF files with pyelftools: a program's interpreter and libraries, notes, sections.

pyelftools is imported where a build uses it: it alone takes ~65 ms to import, and modules the
runtime imports on its start path import this one."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from elftools.elf.elffile import ELFFile


@contextlib.contextmanager
def _elf(data: bytes) -> Iterator[ELFFile]:
    """`data` parsed by pyelftools (lazily: its errors inside the block become ValueError too).

    Raises:
        ValueError: not an ELF file, or a corrupt one.
    """
    from elftools.common.exceptions import ELFError
    from elftools.construct import ConstructError
    from elftools.elf.elffile import ELFFile

    if data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    try:
        yield ELFFile(io.BytesIO(data))
    # pyelftools raises ELFError, but lets a few of its construct parsers' errors through, and
    # OverflowError where a corrupt offset is past what a file can seek to
    except (ELFError, ConstructError, OverflowError) as exc:
        raise ValueError(f"corrupt ELF file: {exc}") from exc


def elf_deps(data: bytes) -> tuple[str | None, list[str]]:
    """An ELF file's program interpreter (PT_INTERP) and DT_NEEDED sonames."""
    from elftools.elf.dynamic import DynamicSegment
    from elftools.elf.segments import InterpSegment

    interp = None
    needed: list[str] = []
    with _elf(data) as elf:
        for segment in elf.iter_segments():
            if isinstance(segment, InterpSegment):
                interp = segment.get_interp_name()
            elif isinstance(segment, DynamicSegment):
                strtab, offset = segment.get_table_offset("DT_STRTAB")
                if strtab is None:
                    continue
                if offset is None:
                    raise ValueError("DT_STRTAB is outside every PT_LOAD segment")
                # pyelftools sets `needed` on DT_NEEDED tags (the soname from the string table)
                needed = [tag.needed for tag in segment.iter_tags("DT_NEEDED")]  # type: ignore[attr-defined]
    return interp, needed


def elf_notes(data: bytes) -> Iterator[tuple[str, int, bytes]]:
    """(name, type, desc) of each note in the PT_NOTE segments."""
    from elftools.elf.enums import ENUM_CORE_NOTE_N_TYPE, ENUM_NOTE_N_TYPE
    from elftools.elf.segments import NoteSegment

    with _elf(data) as elf:
        # pyelftools names the note types it knows (NT_GNU_BUILD_ID, ...) whatever the note's owner
        types = ENUM_CORE_NOTE_N_TYPE if elf["e_type"] == "ET_CORE" else ENUM_NOTE_N_TYPE
        for segment in elf.iter_segments("PT_NOTE"):
            assert isinstance(segment, NoteSegment)
            for note in segment.iter_notes():
                ntype = note["n_type"]
                yield note["n_name"] or "", ntype if isinstance(ntype, int) else types[ntype], note["n_descdata"]


def elf_section(data: bytes, name: str) -> bytes | None:
    """The contents of the section called `name`, or None."""
    with _elf(data) as elf:
        section = elf.get_section_by_name(name)
        return None if section is None else section.data()
