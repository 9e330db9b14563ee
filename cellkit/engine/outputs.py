"""A folder of predictions that loses nothing: what ``cellkit predict --out DIR`` writes.

[`write_predictions`][] predicts images into a folder under these rules:

* **It never replaces a file it did not write.** Before any work, every file it would
  write (``<stem>.csv``, ``<stem>.geojson``, ``<stem>_overlay.png``, ``counts.csv``,
  ``predict.json``) is looked up; one that exists and was not written by an earlier
  prediction run into this folder (for example the annotations ``<stem>.csv`` of a data
  folder given as ``--out``) stops the run, naming it.
* **An earlier run is continued or replaced only when asked.** ``predict.json`` records a
  run's inputs and settings; a folder holding one is refused unless ``resume=True``
  (``--resume``: the images already done are skipped; the inputs and settings must be
  the same) or ``overwrite=True`` (``--overwrite``: the earlier run's files are deleted
  first, and only those).
* **A killed run resumes.** ``predict.json`` is written first (``"status": "running"``)
  and last (``"done"``); every file is written atomically, and an image's ``.csv`` last
  of its files, so a ``.csv`` marks the image done. A resumed run ends with the same
  files as an uninterrupted one.
* **Bad images are reported, not fatal, when asked.** With ``on_error="skip"``
  (``--skip-bad-images``) an unreadable image is left out of ``counts.csv`` and listed,
  with the reason, under ``"skipped"`` in ``predict.json``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["PredictionRun", "check_out_folder", "predict_at_pixel_size", "write_predictions"]

from cellkit.data.guard import check_outputs, claim_each_once, remove_recorded
from cellkit.data.io import (
    DataError,
    DataWarning,
    create_text_if_absent,
    image_mpp,
    make_folder,
    read_image,
    remove_stale_temporaries,
    write_text_atomic,
)
from cellkit.data.writers import qupath_positivity_names, write_csv, write_geojson
from cellkit.engine.cohort import COHORT, summarize_folder
from cellkit.engine.evaluate import OUTPUT_STEMS, PREDICT_META, jsonable, read_prediction_record
from cellkit.engine.predict import list_images
from cellkit.engine.workers import Claims, Shard, WorkerLog, claimed, merged_skipped, remove_worker_files
from cellkit.points import Detections
from cellkit.viz import class_colors, draw_points, save_png
from cellkit.wsi.pipeline import PARTS_SUFFIX, predict_slide, slide_files
from cellkit.wsi.reader import SlideError, is_whole_slide
from cellkit.wsi.summary import _index_class

COUNTS = "counts.csv"


@dataclass
class PredictionRun:
    """What [`write_predictions`][] did.

    Attributes:
        out_dir: the folder.
        counts: per image done (input order), its stem and cells per class.
        skipped: unreadable images left out (file name -> reason).
        resumed: images found done by an earlier run and not predicted again.
        removed: files of an earlier run deleted by ``overwrite=True``.
    """

    out_dir: Path
    counts: list[tuple[str, list[int]]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    resumed: int = 0
    removed: list[Path] = field(default_factory=list)

    @property
    def cells(self) -> int:
        """Cells found in all images."""
        return int(sum(sum(c) for _, c in self.counts))


def _image_files(out: Path, stem: str, overlay: bool, slide: bool = False, gz: bool = False) -> list[Path]:
    """An image's output files, the one that marks it done (its .csv) last; ``gz``: the GeoJSON gzipped."""
    if slide:
        return slide_files(out, stem, gz)
    files = [out / f"{stem}_overlay.png"] if overlay else []
    return files + [out / f"{stem}.geojson{'.gz' if gz else ''}", out / f"{stem}.csv"]


def _read_meta(out: Path) -> dict[str, Any] | None:
    return read_prediction_record(out, "cellkit will not write over a folder it cannot read. Choose another --out")


def _earlier_files(out: Path, meta: Mapping[str, Any]) -> set[Path]:
    """Every file an earlier run recorded in ``meta`` may have written."""
    stems = [str(s) for s in meta.get("inputs", meta.get("images", []))]
    files = {out / COUNTS, out / PREDICT_META, out / COHORT}
    for stem in stems:
        for gz in (False, True):
            files.update(_image_files(out, stem, overlay=True, gz=gz))
            files.update(_image_files(out, stem, overlay=True, slide=True, gz=gz))
    return files


def _without_own_outputs(paths: list[Path]) -> list[Path]:
    """The inputs less the overlays of earlier prediction runs (a folder predicted into itself)."""
    own: dict[Path, set[Path]] = {}
    for folder in {p.parent for p in paths}:
        try:
            meta = _read_meta(folder)
        except ValueError:
            meta = None
        own[folder] = {f.resolve() for f in _earlier_files(folder, meta)} if meta is not None else set()
    kept = [p for p in paths if p.resolve() not in own[p.parent]]
    if not kept:
        raise ValueError("The inputs hold only the overlays of earlier cellkit predict runs; pass the images.")
    return kept


def _settings_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [f"{k} ({old.get(k)!r} then, {new.get(k)!r} now)" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def _counts_from_csv(path: Path, num_classes: int) -> list[int]:
    """Cells per class of a ``<stem>.csv`` written by an earlier run."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = np.array([int(r["class"]) for r in rows], dtype=np.int64)
    return np.bincount(classes, minlength=num_classes)[:num_classes].astype(int).tolist()


def counts_csv(rows: Sequence[tuple[str, Sequence[int]]], class_names: Sequence[str]) -> str:
    """The text of ``counts.csv``: one row per image, one column per class.

    Examples:
        >>> print(counts_csv([("a", [3, 1])], ["neg", "pos"]), end="")
        image,neg,pos
        a,3,1
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", *class_names])
    for stem, counts in rows:
        writer.writerow([stem, *(int(c) for c in counts)])
    return buf.getvalue()


def write_image_files(out: Path, stem: str, image: Any, det: Any, class_names: Sequence[str], overlay: bool,
                      radius: int, geojson_names: Sequence[str] | None = None, gz: bool = False) -> None:
    """Write an image's ``.csv``, ``.geojson`` and overlay PNG, atomically, the ``.csv`` last.

    ``geojson_names``: the classes' names in the GeoJSON (QuPath's), default ``class_names``;
    ``gz``: the GeoJSON gzipped (``.geojson.gz``).
    """
    colors = class_colors(len(class_names))
    if overlay:
        save_png(out / f"{stem}_overlay.png",
                 draw_points(image, det.points, det.classes, len(class_names), radius=radius, colors=colors))
    write_geojson(out / f"{stem}.geojson{'.gz' if gz else ''}", det, list(geojson_names or class_names), colors=colors.tolist(),
                  prob_names=list(class_names))
    write_csv(out / f"{stem}.csv", det, class_names=list(class_names))


def write_predictions(
    predictor: Any,
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    overlay: bool = True,
    overlay_radius: int = 3,
    resume: bool = False,
    overwrite: bool = False,
    on_error: Literal["raise", "skip"] = "raise",
    progress: bool | None = None,
    settings: Mapping[str, Any] | None = None,
    slide: bool | None = None,
    slide_options: Mapping[str, Any] | None = None,
    mpp: float | None = None,
    positive_class: str | None = None,
    shard: Shard | None = None,
    claim: bool = False,
    geojson_gz: bool = False,
) -> PredictionRun:
    """Predict image files and folders into ``out_dir`` without losing anything (see the module).

    Whole slides ([`is_whole_slide`][cellkit.wsi.is_whole_slide]: SVS, NDPI, MRXS, pyramidal TIFF...)
    go through [`predict_slide`][cellkit.wsi.pipeline.predict_slide] (chunks, tissue only,
    slide coordinates) and leave ``<stem>.csv``, ``.geojson``, ``.summary.json``, ``.summary.csv`` and
    ``.thumbnail.png``, and the run ``cohort.csv``
    ([`summarize_folder`][cellkit.engine.cohort.summarize_folder]); other images are read whole and
    leave ``<stem>.csv``, ``.geojson``
    and the overlay.

    Args:
        predictor: a [`Predictor`][cellkit.engine.predict.Predictor].
        inputs: image files and folders ([`list_images`][cellkit.engine.predict.list_images]).
        out_dir: the output folder (created).
        overlay: write ``<stem>_overlay.png`` with the cells drawn.
        overlay_radius: radius of the overlay's dots.
        positive_class: name the cells of this class ``Positive`` and the others ``Negative``
            in the GeoJSON files, so QuPath reports ``Positive %`` per annotation
            ([`qupath_positivity_names`][cellkit.data.writers.qupath_positivity_names]); it is
            also the slides' index class unless ``slide_options`` names one.
        resume: continue the earlier run recorded in ``out_dir``.
        overwrite: delete the earlier run's files first.
        on_error: ``"skip"`` leaves unreadable images out and lists them.
        progress: a bar over images; ``None`` = when stderr is a terminal.
        settings: more settings to record and to check on resume (e.g. the checkpoint).
        slide: read every input as a whole slide (``True``), none (``False``), or decide per
            file (``None``).
        slide_options: keywords of [`predict_slide`][cellkit.wsi.pipeline.predict_slide] (``regions``,
            ``tissue``, ``chunk_size``, ``workers``, ``index_class``...).
        mpp: micrometres per pixel of the inputs, overriding what the files record. When the
            model records the pixel size it was trained at, images are resampled to it.
        shard: predict only this share of the inputs ([`Shard`][cellkit.engine.workers.Shard]),
            one of several workers writing into ``out_dir`` (see [`cellkit.engine.workers`][]).
        claim: take inputs first-come through lock files in ``out_dir/workers/claims``, one of
            any number of workers. With ``shard`` or ``claim`` an earlier run of the same
            inputs and settings in ``out_dir`` is joined (its inputs done are kept), and the
            worker that finds every input done writes ``counts.csv``, the final
            ``predict.json`` and, for slides, ``cohort.csv``.
        geojson_gz: write each GeoJSON gzipped, ``<stem>.geojson.gz`` (QuPath >= 0.4 imports
            it by *File > Import objects* or drag and drop; about a tenth of the size).

    Returns:
        a [`PredictionRun`][].

    Raises:
        FileExistsError: a file to write exists and is not an earlier run's, or an earlier
            run is there and neither ``resume`` nor ``overwrite`` is given.
        ValueError: ``resume`` with other inputs or settings than the earlier run's.

    Examples:
        Not run here (it needs a trained checkpoint and writes ``out/``):

        >>> predictor = Predictor.from_checkpoint("runs/x/best.pt")  # doctest: +SKIP
        >>> run = write_predictions(predictor, ["slides/"], "out/")  # doctest: +SKIP
        >>> run.counts[0]  # doctest: +SKIP
        ('slide1', [412, 97])
    """
    joining = _check_worker_options(shard, claim, overwrite)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues a run, --overwrite replaces it.")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder (it is created when missing).")
    paths = _without_own_outputs(list_images(inputs))
    stems = [p.stem for p in paths]
    slides = _slide_stems(paths, slide)
    clash = sorted({p.name for p in paths if p.stem in OUTPUT_STEMS})
    if clash:
        raise ValueError(
            f"image names {clash} clash with the summary files written to --out ({', '.join(OUTPUT_STEMS)}); "
            "rename them."
        )
    slide_options, settings = _output_options(predictor, positive_class, geojson_gz, slide_options, settings)
    gz = bool(geojson_gz)
    _check_slide_options(paths, slides, slide_options, predictor)
    # Two inputs never write one file (a slide a.svs's a.summary.csv, an image a.summary.png's .csv).
    claim_each_once({str(p): _image_files(out, p.stem, overlay, p.stem in slides, gz) for p in paths})
    slide_options = dict(slide_options or {})
    extra = {**dict(settings or {}), "mpp": mpp, "slides": sorted(slides),
             **({"slide_options": {k: str(v) if isinstance(v, Path) else v for k, v in slide_options.items()
                                   if k not in ("workers", "geojson_names")}}
                if slides else {})}
    record = _record(predictor, overlay, overlay_radius, extra)
    run = PredictionRun(out)
    run.removed = _claim_folder(out, stems, overlay, record, resume or joining, overwrite, slides, join=joining,
                                gz=gz)
    make_folder(out)
    meta = {**record, "inputs": stems, "input_paths": [str(p) for p in paths]}
    worker = _Worker.start(out, meta, shard, claim, gz) if joining else None
    if worker is None:
        remove_stale_temporaries(out)  # of writes killed in an earlier try (never beside live workers)
        write_text_atomic(out / PREDICT_META, json.dumps({**meta, "status": "running", "images": [],
                                                          "skipped": {}}, indent=2) + "\n")
    try:
        by_stem = _predict_images(predictor, shard.take(paths) if shard is not None else paths, out, run,
                                  overlay=overlay, overlay_radius=overlay_radius, resume=resume or joining,
                                  on_error=on_error, progress=progress, slides=slides,
                                  slide_options={**slide_options, "mpp": mpp}, worker=worker)
    finally:
        if worker is not None:
            worker.close()
    run.counts = [(s, by_stem[s]) for s in stems if s in by_stem]
    if worker is not None:
        worker.finish(predictor, stems, slides, overlay)
        return run
    write_text_atomic(out / COUNTS, counts_csv(run.counts, predictor.class_names))
    write_text_atomic(out / PREDICT_META, json.dumps({**meta, "status": "done", "images": [s for s, _ in run.counts],
                                                      "skipped": run.skipped}, indent=2) + "\n")
    if any(s in slides for s, _ in run.counts):
        summarize_folder(out)  # cohort.csv: one row per slide and region
    return run


def _output_options(predictor: Any, positive_class: str | None, geojson_gz: bool,
                    slide_options: Mapping[str, Any] | None,
                    settings: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The slide options and recorded settings of ``positive_class`` (a wrong name fails before any
    work) and of ``geojson_gz`` (recorded only when set: earlier runs resume as they were)."""
    options, recorded = dict(slide_options or {}), dict(settings or {})
    if positive_class is not None:
        if options.get("index_class") is None:
            options["index_class"] = positive_class
        options["geojson_names"] = qupath_positivity_names(predictor.class_names, positive_class)
        recorded["positive_class"] = positive_class
    if geojson_gz:
        options["geojson_gz"] = recorded["geojson_gz"] = True
    return options, recorded


def _check_worker_options(shard: Shard | None, claim: bool, overwrite: bool) -> bool:
    """Whether this run is one of several workers (``shard`` or ``claim``); refuses what clashes."""
    if shard is not None and claim:
        raise ValueError("--shard and --claim are two ways of sharing the inputs between workers; choose one "
                         "(--claim when workers start and stop at any time).")
    joining = shard is not None or bool(claim)
    if joining and overwrite:
        raise ValueError("--overwrite cannot go with --shard or --claim: one worker would delete the files of "
                         "the others. Clear the folder once (or choose a new --out), then start the workers.")
    return joining


class _Worker:
    """One of several workers writing into one folder: its claims (or none) and its record."""

    def __init__(self, out: Path, meta: Mapping[str, Any], log: WorkerLog, claims: Claims | None,
                 gz: bool = False) -> None:
        self.out, self.meta, self.log, self.claims, self.gz = out, dict(meta), log, claims, gz

    @classmethod
    def start(cls, out: Path, meta: Mapping[str, Any], shard: Shard | None, claim: bool, gz: bool = False) -> _Worker:
        # The shared record: written by the first worker, never replaced by a later one.
        text = json.dumps({**meta, "status": "running", "images": [], "skipped": {}}, indent=2) + "\n"
        create_text_if_absent(out / PREDICT_META, text)
        name = shard.name if shard is not None else f"{socket.gethostname() or 'host'}-{os.getpid()}"
        say = lambda line: print(f"cellkit predict: {line}", file=sys.stderr, flush=True)
        claims = Claims(out, name, say=say) if claim else None
        return cls(out, meta, WorkerLog(out, name, shard, claim), claims, gz)

    def close(self) -> None:
        if self.claims is not None:
            self.claims.close()

    def finish(self, predictor: Any, stems: Sequence[str], slides: Collection[str], overlay: bool) -> None:
        """Record this worker done; when every input is done (or failed), write the folder's totals."""
        self.log.finish(self.claims.took_over if self.claims is not None else ())
        done = [s for s in stems
                if all(f.is_file() for f in _image_files(self.out, s, overlay, s in slides, self.gz))]
        skipped = merged_skipped(self.out, done)
        failed = {Path(k).stem for k in skipped}
        if any(s not in done and s not in failed for s in stems):
            return  # another worker finishes the rest and writes the totals
        counts = [(s, _counts_from_csv(self.out / f"{s}.csv", predictor.num_classes)) for s in done]
        write_text_atomic(self.out / COUNTS, counts_csv(counts, predictor.class_names))
        write_text_atomic(self.out / PREDICT_META, json.dumps({**self.meta, "status": "done", "images": done,
                                                               "skipped": skipped}, indent=2) + "\n")
        if slides and any(s in slides for s in done):
            summarize_folder(self.out)


def _check_slide_options(paths: Sequence[Path], slides: Collection[str], options: Mapping[str, Any] | None,
                         predictor: Any) -> None:
    """Options that only whole slides use: refused for plain images, checked before any work."""
    options = dict(options or {})
    if options.get("regions") is not None:
        plain = [p.name for p in paths if p.stem not in slides]
        if plain:
            raise ValueError(
                f"--regions counts cells inside regions of whole slides, but {', '.join(plain[:5])} "
                f"{'is a plain image' if len(plain) == 1 else 'are plain images'} (read whole, in image pixels): "
                "predict those without --regions, or pass --slide to read them as slides."
            )
    if slides and options.get("index_class") is not None:
        _index_class(options["index_class"], list(predictor.class_names))


def _record(predictor: Any, overlay: bool, overlay_radius: int, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings a run records in predict.json (and a resume must repeat), as JSON reads them back."""
    cfg = getattr(predictor, "config", None)
    post = predictor.postprocess
    record: dict[str, Any] = {
        **jsonable(dict(settings or {})),
        "class_names": list(predictor.class_names),
        "class_map": None if cfg is None else cfg.data.class_map,
        "postprocess": {
            "name": None if cfg is None else cfg.postprocess.name,
            **{k: jsonable(getattr(post, k)) for k in ("threshold", "min_distance", "exclusive") if hasattr(post, k)},
        },
        "tile_size": predictor.tile_size,
        "overlap": predictor.overlap,
        # The arithmetic the network ran in (what "auto" resolved to: int8 on the CPU).
        "precision": getattr(predictor, "precision", None),
        "overlay": bool(overlay),
        "overlay_radius": int(overlay_radius),
    }
    return json.loads(json.dumps(record))


def _slide_stems(paths: list[Path], slide: bool | None) -> set[str]:
    """The stems of the inputs read as whole slides."""
    if slide is False:
        return set()
    if slide:
        return {p.stem for p in paths}
    return {p.stem for p in paths if is_whole_slide(p)}


def check_out_folder(out: str | Path, resume: bool = False, overwrite: bool = False, join: bool = False) -> None:
    """The refusals of an output folder that need no model: call before loading one (seconds).

    ``join``: one of several workers (``--shard``/``--claim``): an earlier run is continued.

    Raises:
        FileExistsError: ``out`` holds an earlier run and neither ``resume`` nor ``overwrite``.
        FileNotFoundError: ``resume`` where ``out`` holds no earlier run.
        NotADirectoryError: ``out`` is a file.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder for the predictions.")
    earlier = _read_meta(out) if out.is_dir() else None
    if earlier is None and resume and not join:
        raise FileNotFoundError(
            f"Nothing to resume in {out}: it holds no earlier prediction run ({PREDICT_META}). Drop --resume."
        )
    if earlier is not None and not (resume or overwrite or join):
        raise FileExistsError(_earlier_run_message(out, earlier))


def _earlier_run_message(out: Path, earlier: Mapping[str, Any]) -> str:
    before = earlier.get("inputs", earlier.get("images", []))
    return (f"{out} holds the predictions of an earlier run ({len(before)} images, {earlier.get('status', 'done')}; "
            f"see {out / PREDICT_META}). Pass --resume to finish it (images done are kept), --overwrite to "
            "delete its files and predict again, or choose another --out.")


def _claim_folder(out: Path, stems: list[str], overlay: bool, record: Mapping[str, Any], resume: bool,
                  overwrite: bool, slides: Collection[str] = (), join: bool = False, gz: bool = False) -> list[Path]:
    """Refuse a folder whose files are not ours or whose earlier run was not named; returns files removed.

    ``join``: one of several workers, which continue one run (``resume`` without an earlier one).
    """
    earlier = _read_meta(out) if out.is_dir() else None
    ours = _earlier_files(out, earlier) if earlier is not None else set()
    planned = [f for s in stems for f in _image_files(out, s, overlay, s in slides, gz)] + [out / COUNTS,
                                                                                       out / PREDICT_META]
    planned += [out / COHORT] if slides else []
    check_outputs(
        "cellkit predict", planned, ours=lambda f: f in ours,
        fix="is --out the data folder? Its annotations would be lost: choose an empty or new --out",
    )
    if earlier is None:
        if resume and not join:
            raise FileNotFoundError(
                f"Nothing to resume in {out}: it holds no earlier prediction run ({PREDICT_META}). Drop --resume."
            )
        return []
    before = [str(s) for s in earlier.get("inputs", earlier.get("images", []))]
    if not (resume or overwrite):
        raise FileExistsError(_earlier_run_message(out, earlier))
    if resume:
        same = {k: v for k, v in earlier.items() if k in record}
        if same.get("checkpoint_sha256") and same.get("checkpoint_sha256") == record.get("checkpoint_sha256"):
            same["checkpoint"] = record.get("checkpoint")  # the same file, named another way
        diffs = _settings_differences(same, record)
        if before != stems:
            diffs.insert(0, f"the input images ({len(before)} then, {len(stems)} now)")
        if diffs:
            raise ValueError(
                f"Cannot resume the predictions in {out}: this run differs from the earlier one in "
                f"{'; '.join(diffs[:6])}. Resume with the same inputs and options, pass --overwrite to "
                "predict again, or choose another --out."
            )
        return []
    removed = remove_recorded(out, ours) + remove_worker_files(out)
    for stem in before:  # the finished chunks of an interrupted slide
        parts = out / f".{stem}{PARTS_SUFFIX}"
        if parts.is_dir() and not parts.is_symlink():
            shutil.rmtree(parts)
            removed.append(parts)
    return removed


def _predict_images(predictor: Any, paths: list[Path], out: Path, run: PredictionRun, *, overlay: bool,
                    overlay_radius: int, resume: bool, on_error: str, progress: bool | None,
                    slides: Collection[str] = (), slide_options: Mapping[str, Any] | None = None,
                    worker: _Worker | None = None) -> dict[str, list[int]]:
    """Predict and write every image not done yet; the cells per class of every image done.

    With ``worker`` (``--shard``/``--claim``), ``paths`` is this worker's share and each input is
    predicted only under its claim (when claims are used); the worker's record is kept.
    """
    from tqdm.auto import tqdm
    options = dict(slide_options or {})
    gz = bool(options.get("geojson_gz"))
    by_stem: dict[str, list[int]] = {}
    todo = []
    for path in paths:
        files = _image_files(out, path.stem, overlay, path.stem in slides, gz)
        if resume and all(f.is_file() for f in files):
            by_stem[path.stem] = _counts_from_csv(files[-1], predictor.num_classes)
            run.resumed += 1
        else:
            todo.append(path)
    show = sys.stderr.isatty() if progress is None else progress
    claims = None if worker is None else worker.claims

    def is_done(path: Path) -> bool:
        return all(f.is_file() for f in _image_files(out, path.stem, overlay, path.stem in slides, gz))

    def failed(path: Path, err: Exception) -> None:
        if on_error == "raise":
            raise err
        run.skipped[path.name] = str(err)
        if worker is not None:
            worker.log.skipped(path.name, str(err))

    def done(path: Path, counts: list[int]) -> None:
        by_stem[path.stem] = counts
        if worker is not None:
            worker.log.predicted(path.stem)

    plain = [p for p in todo if p.stem not in slides]
    for path in claimed([p for p in todo if p.stem in slides], claims, is_done):
        try:
            # The folder was claimed above: what exists now is an earlier run's, ours to replace.
            result = predict_slide(predictor, path, out, stem=path.stem, resume=resume, progress=progress,
                                   overwrite=True, **options)
        except (SlideError, DataError, OSError) as err:
            failed(path, err)
            continue
        done(path, [int(c) for c in result.detections.counts(predictor.num_classes)])
    sizes = _PixelSizeNotes(predictor, options.get("mpp"))
    for path in tqdm(claimed(plain, claims, is_done), desc="predict", unit="image", total=len(plain),
                     disable=not show or not plain):
        try:
            image = read_image(path)
        except (DataError, OSError) as err:
            failed(path, err)
            continue
        det = predict_at_pixel_size(predictor, image, sizes.mpp_of(path))
        write_image_files(out, path.stem, image, det, predictor.class_names, overlay, overlay_radius,
                          options.get("geojson_names"), gz)
        done(path, [int(c) for c in det.counts(predictor.num_classes)])
    return by_stem


def model_mpp(predictor: Any) -> float | None:
    """The micrometres per pixel a predictor's model was trained at, when its config records it."""
    value = getattr(getattr(getattr(predictor, "config", None), "data", None), "mpp", None)
    return float(value) if value else None


class _PixelSizeNotes:
    """The pixel size of each plain image (``--mpp``, else the file's), saying once what is done.

    When the model and the image both know their pixel size, the image is resampled to the
    model's; when one of them does not, the image is predicted as it is, with one warning
    per run that says how to fix it.
    """

    def __init__(self, predictor: Any, given: float | None) -> None:
        self.model = model_mpp(predictor)
        self.given = float(given) if given else None
        self.said: set[str] = set()

    def _say(self, key: str, text: str) -> None:
        if key not in self.said:
            self.said.add(key)
            warnings.warn(text, DataWarning, stacklevel=3)

    def mpp_of(self, path: Path) -> float | None:
        mpp = self.given if self.given is not None else image_mpp(path)
        if self.model is None:
            here = f" ({mpp:g} um/px)" if mpp is not None else ""
            self._say("model", f"the model records no pixel size, so {path.name}{here} and the other images are "
                      "predicted at their own pixels; a model trained with cellkit train --mpp (micrometres per "
                      "pixel of its images) resamples every image to its own pixel size.")
            return None
        if mpp is None:
            self._say("image", f"{path.name} records no pixel size; it is predicted as if it were at the model's "
                      f"{self.model:g} um/px (cells of another size are found less well). Pass --mpp with the "
                      "scanner's micrometres per pixel (e.g. --mpp 0.25 for a 40x scan) to resample it.")
            return None
        if abs(mpp / self.model - 1.0) > 1e-6:
            source = "--mpp" if self.given is not None else "the file"
            self._say(f"resample {mpp:g}", f"images at {mpp:g} um/px ({source}) are resampled to the model's "
                      f"{self.model:g} um/px (x{mpp / self.model:.3g}) and the cells mapped back to their pixels.")
        return mpp


def predict_at_pixel_size(predictor: Any, image: np.ndarray, mpp: float | None) -> Any:
    """The cells of a whole image, resampled to the model's pixel size when both are known.

    With ``mpp`` (the image's micrometres per pixel) and a model that records the pixel size
    it was trained at, the image is resized by ``mpp / model_mpp`` (area averaging when it
    shrinks), predicted, and the points are mapped back to the image's pixels.

    Examples:
        Not run here (it needs a trained model):

        >>> # a 40x scan, with a model trained at 0.5 um per pixel
        >>> det = predict_at_pixel_size(predictor, image, mpp=0.25)  # doctest: +SKIP
    """
    from PIL import Image
    cfg = getattr(predictor, "config", None)
    model_mpp = getattr(getattr(cfg, "data", None), "mpp", None)
    if not mpp or not model_mpp or abs(float(model_mpp) / float(mpp) - 1.0) < 1e-6:
        return predictor.predict(image)
    scale = float(model_mpp) / float(mpp)
    h, w = image.shape[:2]
    ow, oh = max(1, int(round(w / scale))), max(1, int(round(h / scale)))
    resample = Image.Resampling.BOX if scale > 1 else Image.Resampling.BILINEAR
    small = np.asarray(Image.fromarray(image).resize((ow, oh), resample=resample))
    det = predictor.predict(small)
    sx, sy = w / ow, h / oh
    pts = (det.points.astype(np.float64) + 0.5) * np.array([sx, sy]) - 0.5
    return Detections(pts.astype(np.float32), det.classes, det.scores, det.probs)
