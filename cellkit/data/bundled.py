"""The EndoNuke sample bundled with a source checkout of cellkit (``data/endonuke``).

251 tiles of ER/PR-stained endometrium (200x200) with nucleus points, from EndoNuke
(Data 2022, 7(6), 75, doi:10.3390/data7060075; CC BY 4.0). ``data/endonuke/NOTICE.md``
holds the citation, the licence and the provenance. The examples use it, so they run on
real data with no arguments.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLED_KNOWN_NOTES", "ENDONUKE_MPP", "bundled_endonuke", "is_bundled"]

ENDONUKE_MPP = 0.5
"""Micrometres per pixel of the EndoNuke tiles: each 200-px tile is a 100 um field of the
slide (the dataset's description, Naumov et al., Data 2022). ``cellkit train`` on the bundled
sample records it with the model, so ``cellkit predict`` resamples scans of another pixel size."""

BUNDLED_KNOWN_NOTES = {"transparent": ("741.png", "742.png", "743.png", "744.png")}
"""What the bundled sample is known to hold, said once in ``data/endonuke/NOTICE.md`` instead of
warned on every read: tiles 741-744 end 76 rows before their bottom edge (the slide's scan
ends there), stored as transparent black; cellkit reads them as the black they hold."""

# cellkit/data/bundled.py -> the repository root is three levels up.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def bundled_endonuke() -> Path:
    """The folder of the bundled EndoNuke sample (``images/``, ``labels/``).

    Read it with ``load_dataset(bundled_endonuke(), "endonuke")``; add
    ``class_map="endonuke_epithelium"`` for the paper's two classes (epithelium = 1).

    Raises:
        FileNotFoundError: outside a source checkout (an installed wheel does not ship
            the data), saying where it looked.

    Examples:
        >>> bundled_endonuke().name  # doctest: +SKIP
        'endonuke'
    """
    path = _REPO_ROOT / "data" / "endonuke"
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return path
    raise FileNotFoundError(
        f"The bundled EndoNuke sample was not found: looked for {path}/images and "
        f"{path}/labels (relative to the cellkit package at {Path(__file__).resolve().parent}). "
        "It ships only with a source checkout of cellkit; pass --data /path/to/dataset "
        "(or a folder to load_dataset) instead."
    )


def is_bundled(root: str | Path) -> bool:
    """Whether ``root`` is the bundled EndoNuke sample of this checkout.

    Examples:
        >>> is_bundled("/somewhere/else")
        False
    """
    try:
        return Path(root).expanduser().resolve() == (_REPO_ROOT / "data" / "endonuke").resolve()
    except OSError:
        return False
