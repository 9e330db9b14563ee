"""One table for a cohort of slides: ``cellkit summarize OUT/`` merges the per-slide summaries.

Every slide that ``cellkit predict`` finished in a folder leaves ``<stem>.summary.json``
(written atomically, last but one of its files). [`summarize_folder`][] reads those, and
only those, into ``OUT/cohort.csv``: one row per slide, then one per region of it, with the
counts per class, the share of the class of interest (``index``), the tissue area and the
cells per mm², the model and the cellkit version that predicted it. It re-runs nothing and
can run while workers still predict into the folder: a slide counts once its summary is
written; the slides the run records (``predict.json``) without a summary yet are listed as
not finished, those it (or any of its workers, ``OUT/workers/*.json``) skipped as failed,
with their error.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellkit.data.guard import check_outputs
from cellkit.data.io import write_text_atomic
from cellkit.engine.evaluate import read_prediction_record
from cellkit.engine.workers import merged_skipped

__all__ = ["COHORT", "CohortSummary", "summarize_folder"]

COHORT = "cohort.csv"
"""The cohort table's file name in the predictions folder."""

_SUMMARY_SUFFIX = ".summary.json"
_MAX_SUMMARY_BYTES = 64 * 1024 * 1024  # a slide's summary is kilobytes; a larger file is not one
_FIXED = ["slide", "scope", "name", "cells"]
_TAIL = ["index_class", "index", "tissue_area_mm2", "cells_per_mm2", "model", "cellkit_version"]


@dataclass
class CohortSummary:
    """What [`summarize_folder`][] found and wrote.

    Attributes:
        path: the ``cohort.csv`` written.
        slides: the stems of the slides in the table, in file-name order.
        rows: the number of rows (slides and regions).
        failed: ``{input name: error}`` of the inputs a run skipped.
        unfinished: the inputs a run records that have no summary yet (still running, killed,
            or plain images, which have no summary).
    """

    path: Path
    slides: list[str] = field(default_factory=list)
    rows: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    unfinished: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One paragraph for the command line."""
        text = f"{len(self.slides)} slides, {self.rows} rows -> {self.path}"
        if self.failed:
            shown = "; ".join(f"{name}: {why}" for name, why in list(self.failed.items())[:5])
            text += f"\n{len(self.failed)} failed (listed in predict.json): {shown}"
        if self.unfinished:
            more = f", ... ({len(self.unfinished) - 10} more)" if len(self.unfinished) > 10 else ""
            text += (f"\n{len(self.unfinished)} inputs have no summary yet (still predicting, stopped, or plain "
                     f"images): {', '.join(self.unfinished[:10])}{more}")
        return text


def summarize_folder(out: str | Path) -> CohortSummary:
    """Merge the slide summaries of a predictions folder into ``OUT/cohort.csv``.

    Args:
        out: the ``--out`` folder of ``cellkit predict`` (of one or of several workers).

    Returns:
        A [`CohortSummary`][].

    Raises:
        FileNotFoundError: when ``out`` is not a folder, or holds no slide summary.
        ValueError: for a summary that is not one ``cellkit predict`` wrote (named).
        cellkit.data.guard.OutputClash: when ``OUT/cohort.csv`` exists and is not a cohort table.
    """
    out = Path(out).expanduser()
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such folder; give the --out folder of cellkit predict.")
    files = sorted(p for p in out.glob(f"*{_SUMMARY_SUFFIX}") if p.is_file() and not p.is_symlink())
    record = read_prediction_record(out, "predict the slides again into a new folder")
    settings = record or {}
    summaries = [(p.name[: -len(_SUMMARY_SUFFIX)], _read_summary(p)) for p in files]
    if not summaries:
        raise FileNotFoundError(
            f"{out} holds no slide summary (<slide>{_SUMMARY_SUFFIX}): no slide has finished there yet, or it is "
            "not the --out folder of cellkit predict on whole slides."
        )
    path = out / COHORT
    check_outputs("cellkit summarize", [path], ours=_is_cohort_table,
                  fix="it is not a cohort table of cellkit summarize; move it away or summarize another folder")
    classes = _class_columns(s for _, s in summaries)
    model = str(settings.get("checkpoint", "")) or None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*_FIXED, *classes, *_TAIL])
    rows = 0
    for stem, summary in summaries:
        for scope, name, part in [("slide", stem, summary)] + [
                ("region", str(r.get("name", "")), r) for r in summary.get("regions") or [] if isinstance(r, dict)]:
            writer.writerow(_row(stem, scope, name, part, classes, model, summary.get("cellkit_version")))
            rows += 1
    write_text_atomic(path, buf.getvalue())
    done = {stem for stem, _ in summaries}
    inputs = [str(s) for s in settings.get("inputs", [])]
    skipped = settings.get("skipped") if isinstance(settings.get("skipped"), dict) else {}
    failed = {str(k): str(v) for k, v in skipped.items()}
    failed.update(merged_skipped(out, sorted(done)))  # of several workers (OUT/workers/*.json)
    failed_stems = {Path(k).stem for k in failed}
    unfinished = [s for s in inputs if s not in done and s not in failed_stems]
    return CohortSummary(path, [s for s, _ in summaries], rows, failed, unfinished)


def _read_summary(path: Path) -> dict[str, Any]:
    """A slide summary as ``write_summary`` wrote it (bounded in size; checked for its keys)."""
    if path.stat().st_size > _MAX_SUMMARY_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size} bytes, not a slide summary of cellkit predict "
                         f"(those are kilobytes); move it out of the folder.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"{path} is not a slide summary of cellkit predict ({err}); move it out of the folder.") from err
    if not isinstance(data, dict) or not isinstance(data.get("counts"), dict) or "cells" not in data:
        raise ValueError(f"{path} is not a slide summary of cellkit predict (no 'cells' and 'counts'); move it out "
                         "of the folder.")
    return data


def _class_columns(summaries: Any) -> list[str]:
    """The class names of every summary, in the order they first appear."""
    names: list[str] = []
    for summary in summaries:
        for name in summary["counts"]:
            if str(name) not in names:
                names.append(str(name))
    return names


def _row(stem: str, scope: str, name: str, part: Mapping[str, Any], classes: Sequence[str], model: str | None,
         version: Any) -> list[str]:
    counts = part.get("counts") if isinstance(part.get("counts"), dict) else {}
    index = part.get("index") if isinstance(part.get("index"), dict) else {}
    density = part.get("cells_per_mm2") if isinstance(part.get("cells_per_mm2"), dict) else {}
    area = part.get("tissue_area_mm2", part.get("area_mm2"))
    values = [stem, scope, name, part.get("cells"), *(counts.get(c, 0) for c in classes),
              index.get("class"), index.get("value"), area, density.get("all"), model, version]
    return ["" if v is None else str(v) for v in values]


def _is_cohort_table(path: Path) -> bool:
    """An earlier ``cohort.csv`` of cellkit summarize (its header), which may be replaced."""
    try:
        with open(path, encoding="utf-8") as fh:
            header = fh.readline(4096).rstrip("\n").split(",")
    except (OSError, UnicodeDecodeError):
        return False
    return header[: len(_FIXED)] == _FIXED and header[-len(_TAIL):] == _TAIL
