"""What each command may write and delete: one place for ``train``, ``predict``, ``evaluate``,
``plot`` and ``export``.

The rules (stated for users in ``docs/safety.md``):

* **A command lists what it will write before it starts.** [`check_outputs`][] looks each
  planned file up; one that exists and that cellkit did not write stops the command, naming
  the files and the fix. Nothing is written before the check.
* **A file counts as cellkit's** when an earlier run's record names it (``predict.json``,
  a run folder), or when it carries cellkit's mark: every PNG cellkit draws holds a
  ``Software: cellkit`` text chunk ([`mark_png`][]); CSV and JSON reports are recognised by
  their exact header or keys ([`written_by_cellkit`][]). A PNG without the mark (yours, or
  drawn by an older cellkit) is not replaced.
* **Two inputs never write one file.** [`claim_each_once`][] refuses a plan in which two
  inputs would write the same path.
* **Deleting** ([`remove_recorded`][]) removes only regular files directly inside the
  command's folder, named by a record of that folder, with a name cellkit writes and a
  content that starts as cellkit's does; a name in a record that is not a plain file name
  (``../x``, ``/abs``, ``a/b``) makes the whole record untrusted ([`plain_name`][]).
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from cellkit.data.io import write_bytes_atomic

__all__ = [
    "OutputClash",
    "check_outputs",
    "claim_each_once",
    "is_marked_png",
    "mark_png",
    "plain_name",
    "remove_recorded",
    "write_png",
    "written_by_cellkit",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MARK_KEY = b"Software"
MARK_VALUE = b"cellkit"


class OutputClash(FileExistsError):
    """A file a command would write exists and cellkit did not write it (the message names it)."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def mark_png(data: bytes) -> bytes:
    """PNG bytes with cellkit's mark (a ``Software: cellkit`` text chunk after the header).

    Examples:
        >>> import io
        >>> from PIL import Image
        >>> buf = io.BytesIO(); Image.new("RGB", (2, 2)).save(buf, format="PNG")
        >>> marked = mark_png(buf.getvalue())
        >>> Image.open(io.BytesIO(marked)).text["Software"]
        'cellkit'
    """
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("mark_png expects the bytes of a PNG file.")
    end = 8 + 8 + struct.unpack(">I", data[8:12])[0] + 4  # signature, IHDR chunk
    return data[:end] + _chunk(b"tEXt", MARK_KEY + b"\0" + MARK_VALUE) + data[end:]


def is_marked_png(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a PNG that holds cellkit's mark (read: its chunks before the pixels)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    if not head.startswith(PNG_SIGNATURE):
        return False
    at = 8
    while at + 8 <= len(head):
        size = struct.unpack(">I", head[at:at + 4])[0]
        kind = head[at + 4:at + 8]
        if kind in (b"IDAT", b"IEND"):
            return False
        if kind == b"tEXt" and head[at + 8:at + 8 + size] == MARK_KEY + b"\0" + MARK_VALUE:
            return True
        at += 12 + size
    return False


def write_png(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write PNG bytes atomically, with cellkit's mark (so a later run knows the file is its own)."""
    write_bytes_atomic(path, mark_png(data))
    return Path(path)


def _first_line(path: Path, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(limit)
    except OSError:
        return ""
    return head.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")


#: What the text files cellkit writes begin with, by kind (see ``written_by_cellkit``).
_STARTS: Mapping[str, Callable[[str], bool]] = {
    "points-csv": lambda line: line in ("x,y,class", "x,y,class,score") or line.startswith("x,y,class,score,confidence"),
    "suggestions-csv": lambda line: line.startswith("rank,image,x,y,width,height,score"),
    "curve-csv": lambda line: line.startswith("radius,totalF1_"),
    "counts-csv": lambda line: line.startswith("image,") or line == "image",
    "json": lambda line: line.startswith("{"),
}


def written_by_cellkit(path: str | os.PathLike[str], kind: str | None = None) -> bool:
    """Whether an existing file looks like one cellkit writes, for files no record names.

    ``kind``: ``"png"`` (holds cellkit's mark), ``"points-csv"``, ``"curve-csv"``,
    ``"counts-csv"``, ``"suggestions-csv"`` (the header cellkit writes), ``"json"`` (a JSON object);
    default: from the suffix (``.png`` needs the mark; other suffixes are never assumed ours).

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "f1_vs_radius.csv")
        >>> _ = open(path, "w").write("radius,totalF1_a\\n")
        >>> written_by_cellkit(path, "curve-csv")
        True
        >>> written_by_cellkit(path, "points-csv")
        False
    """
    p = Path(path)
    if not p.is_file() or p.is_symlink():
        return False
    kind = kind or ("png" if p.suffix.lower() == ".png" else None)
    if kind == "png":
        return is_marked_png(p)
    if kind in _STARTS:
        return _STARTS[kind](_first_line(p))
    return False


def _names(files: list[Path], shown: int = 5) -> str:
    text = ", ".join(str(f) for f in files[:shown])
    return text + (f" and {len(files) - shown} more" if len(files) > shown else "")


def check_outputs(
    command: str,
    files: Iterable[str | os.PathLike[str]],
    *,
    ours: Callable[[Path], bool] | None = None,
    fix: str = "choose another output, or move those files away first",
) -> None:
    """Refuse, before any work, to replace a file cellkit did not write.

    Args:
        command: the command, for the message (``"cellkit evaluate"``).
        files: every file the command will write.
        ours: says whether an existing file is cellkit's to replace (default
            [`written_by_cellkit`][] by suffix: a marked PNG).
        fix: what the user can do, for the message.

    Raises:
        OutputClash: naming the files that exist and are not cellkit's, and the fix.
        IsADirectoryError: when a file to write is a folder.

    Examples:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> _ = open(os.path.join(folder, "errors.png"), "w").write("mine")
        >>> check_outputs("cellkit evaluate",
        ...               [os.path.join(folder, "errors.png")])
        ... # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        cellkit.data.guard.OutputClash: cellkit evaluate would replace
        1 file it did not write: .../errors.png; ...
    """
    is_ours = ours or (lambda p: written_by_cellkit(p))
    planned = [Path(f) for f in files]
    folders = [f for f in planned if f.is_dir()]
    if folders:
        raise IsADirectoryError(f"{command} writes the file {folders[0]}, but it is a folder; {fix}.")
    foreign = [f for f in planned if (f.exists() or f.is_symlink()) and (f.is_symlink() or not is_ours(f))]
    if foreign:
        raise OutputClash(
            f"{command} would replace {len(foreign)} file{'s' if len(foreign) > 1 else ''} it did not write: "
            f"{_names(foreign)}; {fix}."
        )


def claim_each_once(plan: Mapping[str, Iterable[Path]], what: str = "input") -> None:
    """Refuse a plan in which two inputs would write the same file.

    Args:
        plan: each input's name -> the files it writes.

    Raises:
        ValueError: naming the two inputs and the file.

    Examples:
        >>> from pathlib import Path
        >>> same = [Path("o/a.summary.csv")]
        >>> claim_each_once({"a.svs": same, "a.summary.png": same})
        ... # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        ValueError: The inputs a.svs and a.summary.png would both
        write o/a.summary.csv, ...
    """
    seen: dict[Path, str] = {}
    for name, files in plan.items():
        for f in files:
            other = seen.setdefault(f, name)
            if other != name:
                raise ValueError(
                    f"The {what}s {other} and {name} would both write {f}, and one would replace the other's; "
                    "rename one of them, or predict them into different --out folders."
                )


_BAD_NAME = re.compile(r"[/\\\x00]")


def plain_name(value: Any, record: str | os.PathLike[str]) -> str:
    """``value`` when it is a plain file name (no folder part, not ``.``/``..``), else a ValueError.

    Names read from a record (``predict.json``) decide which files a command replaces or
    deletes; a name that reaches outside the folder makes the record untrusted.

    Examples:
        >>> plain_name("slide-01", "out/predict.json")
        'slide-01'
        >>> plain_name("../victim/precious", "out/predict.json")
        ... # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        ValueError: out/predict.json lists '../victim/precious',
        which is not a file name ...
    """
    text = value if isinstance(value, str) else None
    if (text is None or not text or text in (".", "..") or _BAD_NAME.search(text)
            or os.path.isabs(text) or (os.name == "nt" and ":" in text)):
        raise ValueError(
            f"{record} lists {value!r}, which is not a file name inside its folder (a record cellkit wrote names "
            "only files beside it); cellkit will not write over, nor delete from, a folder whose record points "
            "elsewhere. Choose another --out (or delete that record if the folder is yours)."
        )
    return text


#: What a file cellkit may delete starts with, by the end of its name.
_CONTENT_STARTS: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    (".summary.csv", (b"scope,name,cells",)),
    (".csv", (b"x,y,class", b"image")),
    (".png", (PNG_SIGNATURE,)),
    (".json", (b"{",)),
    (".geojson", (b"{",)),
)


def _looks_like_output(path: Path) -> bool:
    name = path.name
    for ending, starts in _CONTENT_STARTS:
        if name.endswith(ending):
            try:
                with open(path, "rb") as fh:
                    head = fh.read(16).lstrip()
            except OSError:
                return False
            return any(head.startswith(s) for s in starts)
    return False


def remove_recorded(folder: str | os.PathLike[str], files: Iterable[Path]) -> list[Path]:
    """Delete the files of an earlier run that a record of ``folder`` names, and nothing else.

    Only regular files (not links) directly inside ``folder``, with an ending cellkit writes
    (``.csv``, ``.geojson``, ``.png``, ``.json``) and content that starts as cellkit's does,
    are removed; anything else is left where it is.

    Returns:
        the files removed.
    """
    base = Path(folder).resolve()
    removed = []
    for f in sorted({Path(p) for p in files}):
        if f.is_symlink() or not f.is_file():
            continue
        if f.resolve().parent != base or not _looks_like_output(f):
            continue
        f.unlink()
        removed.append(f)
    return removed
