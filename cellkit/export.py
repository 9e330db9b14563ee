"""Export a trained model to ONNX or TorchScript, to run without cellkit.

The exported model is what inference runs
([`cellkit.models.MultiDecoderModel.infer`][cellkit.models.model.MultiDecoderModel.infer]):
the encoder, the main decoder and the activation, so it maps normalised images to the maps
the cells are found on: probabilities for the paper's models (sigmoid), density maps for
FCRN (identity). The other heads (``dynamic``, ``prior``) are training aids and are left
out. BatchNorm is folded into the convolutions first
([`cellkit.models.fuse.fold_batchnorm`][]) and the model is exported in eval mode.

Any input size works, as in cellkit: the batch size, the height and the width are dynamic.
The exported forward pads the input at the bottom and right to a multiple of the encoder's
deepest stride (reflect, or replicate when the image is smaller than the padding, exactly
as [`MultiDecoderModel`][cellkit.models.MultiDecoderModel] does), upsamples the logits to the padded size
and crops them back, with every size read from the input at run time (no size of the
example input is baked in). Before the file is written, its output is compared with
PyTorch's on inputs of sizes different from the example's (``check=True``).

Everything needed to use the maps travels in the file as a JSON document (see
[`load_exported_metadata`][]): the class names, the peak thresholds calibrated at training
time and the peak minimum distances (one per class), the model's pixel size, the ImageNet
normalisation the input expects, and the cellkit version. ONNX keeps it in the model's
``metadata_props`` (key ``cellkit.json``, plus one entry per field), TorchScript as the extra
file ``cellkit.json`` of the archive.

ONNX is written with torch's ``torch.export``-based exporter (``dynamo=True``, which needs
the ``onnxscript`` package), not the legacy TorchScript-based one (``dynamo=False``): the
legacy exporter traces the model, so the Python integer arithmetic of the padding (the
``max(ceil(H / stride), 2) * stride`` padded size) is frozen at the example's value and
inputs smaller than twice the stride come out wrong, and it is deprecated since torch 2.9.
The ``torch.export`` one carries the sizes symbolically and gives the same maps as PyTorch at
every size. TorchScript is written with ``torch.jit.script``, not ``torch.jit.trace``, for the
same reason. Install the ONNX tools with ``pip install "cellkit[export]"`` (``onnx``,
``onnxscript``, and ``onnxruntime`` for the check).

For example:

```python
from cellkit.export import export_model, load_exported_metadata

export_model("runs/ours/best.pt", "model.onnx")  # the format from the suffix
export_model("runs/ours/best.pt", "model.pt", format="torchscript")
load_exported_metadata("model.onnx")["threshold"]  # e.g. [0.45, 0.5]
```

See the page "Export a model" of the documentation for running the file with ONNX Runtime
or ``torch.jit.load`` alone.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cellkit._version import __version__
from cellkit.builder import apply_activation
from cellkit.data.guard import check_outputs
from cellkit.data.io import write_bytes_atomic
from cellkit.engine.checkpoint import file_fingerprint, load_checkpoint, load_model
from cellkit.imaging import IMAGENET_MEAN, IMAGENET_STD
from cellkit.lookup import look_up_option
from cellkit.models.fuse import fold_batchnorm
from cellkit.models.model import to_input_size
from cellkit.postprocess.peaks import per_class
from cellkit.registry import POSTPROCESSORS

__all__ = ["EXPORT_FORMATS", "ExportError", "InferenceModule", "export_model", "load_exported_metadata"]

EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
"""The formats [`export_model`][] writes."""

METADATA_KEY = "cellkit.json"
INPUT_NAME = "image"
OUTPUT_NAME = "maps"

# File suffix -> format, when none is given.
_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript",
             ".torchscript": "torchscript", ".jit": "torchscript"}
# The example input the model is exported with: padding needed in both directions, so no
# "no padding" special case is taken, and a batch of 2, so the batch is not taken for 1.
_EXAMPLE_SHAPE = (2, 3, 67, 89)
# The sizes the exported model is checked on: an odd size larger than the example's, and
# one smaller than twice the stride (the replicate padding).
_CHECK_SIZES: tuple[tuple[int, int], ...] = ((97, 131), (13, 37))


class ExportError(RuntimeError):
    """A model that could not be exported, or whose export does not compute what PyTorch does."""


class InferenceModule(nn.Module):
    """Encoder, one decoder and the activation, for any input size: what is exported.

    Computes ``activation(model.infer(x))`` of a [`MultiDecoderModel`][cellkit.models.MultiDecoderModel]
    with tensor operations whose sizes all come from the input at run time, so that
    ``torch.jit.script`` and ``torch.export`` keep the height and width dynamic: the rows and
    columns of the padded input are gathered with computed indices (reflect padding, or
    replicate when an image is smaller than its padding), and the logits are resized to the
    padded size and cropped back.

    Args:
        encoder: the model's encoder (returns a list of features).
        decoder: the decoder to run (the model's main one).
        output_stride: the multiple the input is padded to (the model's ``output_stride``).
        activation: ``"sigmoid"`` (probabilities) or ``"identity"`` (density maps).

    Shapes:
        - Input: ``(B, C, H, W)`` float32 normalised images, any ``H, W >= 1``.
        - Output: ``(B, num_classes, H, W)`` maps.

    Examples:
        >>> import cellkit, torch
        >>> model = cellkit.build_model(cellkit.presets.ours(size="cpu")).eval()
        >>> module = InferenceModule.from_model(model)
        >>> x = torch.randn(1, 3, 21, 35)
        >>> bool(torch.allclose(module(x), torch.sigmoid(model.infer(x)), atol=1e-6))
        True
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, output_stride: int, activation: str = "sigmoid") -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.output_stride = int(output_stride)
        self.sigmoid = look_up_option(activation, ("sigmoid", "identity"), what="activation") == "sigmoid"

    @classmethod
    def from_model(cls, model: nn.Module) -> InferenceModule:
        """The inference part of a [`MultiDecoderModel`][cellkit.models.MultiDecoderModel] (its modules, shared).

        Raises:
            TypeError: for a model without ``encoder``, ``decoders``, ``main``,
                ``output_stride`` and ``activation``.
        """
        needed = ("encoder", "decoders", "main", "output_stride", "activation")
        lacking = [name for name in needed if not hasattr(model, name)]
        if lacking:
            raise TypeError(
                f"expected a cellkit MultiDecoderModel (with {', '.join(needed)}), got {type(model).__name__} "
                f"without {', '.join(lacking)}; build the model with cellkit.build_model(config)."
            )
        return cls(model.encoder, model.decoders[model.main], model.output_stride, model.activation)

    def forward(self, image: Tensor) -> Tensor:
        h = image.shape[2]
        w = image.shape[3]
        m = self.output_stride
        padded_h = max((h + m - 1) // m, 2) * m
        padded_w = max((w + m - 1) // m, 2) * m
        i = torch.arange(padded_h, device=image.device)
        j = torch.arange(padded_w, device=image.device)
        reflect_i = torch.where(i < h, i, 2 * (h - 1) - i)
        reflect_j = torch.where(j < w, j, 2 * (w - 1) - j)
        # Reflect padding where it is defined in both directions (padding < size), as
        # MultiDecoderModel does; else replicate the last row and column.
        reflect = (reflect_i.min() >= 0) & (reflect_j.min() >= 0)
        rows = torch.where(reflect, reflect_i, i.clamp(max=h - 1))
        cols = torch.where(reflect, reflect_j, j.clamp(max=w - 1))
        padded = image.index_select(2, rows).index_select(3, cols)
        logits = to_input_size(self.decoder(self.encoder(padded)), [padded_h, padded_w], [h, w])
        if self.sigmoid:
            logits = torch.sigmoid(logits)
        return logits


def export_model(
    checkpoint: str | Path,
    out: str | Path,
    format: str | None = None,
    opset: int | None = None,
    *,
    overwrite: bool = False,
    check: bool = True,
) -> Path:
    """Write the inference model of a checkpoint as an ONNX or TorchScript file.

    The file holds the encoder, the main decoder and the activation (BatchNorm folded, eval
    mode), takes ``(B, 3, H, W)`` float32 images of any size normalised as cellkit does
    (``(rgb / 255 - mean) / std`` with ImageNet's mean and std) and returns ``(B, C, H, W)``
    maps: probabilities, or density maps for FCRN. Its metadata is described in
    [`load_exported_metadata`][]. The file is written atomically
    ([`cellkit.data.io.write_bytes_atomic`][]): an interrupted export leaves no partial file.

    Args:
        checkpoint: a checkpoint of ``cellkit train`` (``RUN_DIR/best.pt``), or the run folder.
        out: the file to write (``model.onnx``, ``model.pt``).
        format: ``"onnx"`` or ``"torchscript"``; ``None`` chooses by the suffix of ``out``
            (``.onnx``: ONNX; ``.pt``, ``.pth``, ``.ts``, ``.torchscript``, ``.jit``: TorchScript).
        opset: the ONNX opset version (default: the exporter's, 18 or later); ONNX only.
        overwrite: replace ``out`` when it exists, if it is a model exported by cellkit (any
            other file is never replaced).
        check: compare the exported model's output with PyTorch's on two odd-sized inputs
            before writing, and raise [`ExportError`][] if they differ by more than 1e-4
            (relative to the largest value for density maps). For ONNX it needs
            ``onnxruntime``.

    Returns:
        The path written.

    Raises:
        ValueError: for an unknown format, a suffix that names none, an opset for
            TorchScript, or ``out`` naming the checkpoint itself.
        FileExistsError: when ``out`` exists and ``overwrite`` is false, or it is not a model
            exported by cellkit.
        FileNotFoundError: for a missing checkpoint.
        CheckpointError: for a corrupt checkpoint, or one that does not match the code.
        ImportError: when the ONNX packages are not installed.
        ExportError: when the model does not export (e.g. a plug-in module that
            ``torch.jit.script`` or ``torch.export`` cannot read), or the check fails.

    Examples:
        Not run here (they need a trained checkpoint and write into the current folder):

        >>> export_model("runs/ours/best.pt", "model.onnx")  # doctest: +SKIP
        >>> export_model("runs/ours/best.pt", "model.pt",  # doctest: +SKIP
        ...              overwrite=True)
    """
    out = Path(out)
    fmt = _resolve_format(format, out)
    if opset is not None:
        if fmt != "onnx":
            raise ValueError(f"opset is for ONNX, got opset={opset!r} with format={fmt!r}; leave it out.")
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < 18:
            raise ValueError(
                f"opset must be an integer >= 18 (torch's ONNX exporter writes opset 18 and later), got {opset!r}; "
                "leave it out for the exporter's default."
            )
    ckpt_path = Path(checkpoint)
    if ckpt_path.is_dir():
        ckpt_path = Path(load_checkpoint(ckpt_path)["path"])
    if out.exists() and ckpt_path.exists() and out.resolve() == ckpt_path.resolve():
        raise ValueError(f"out ({out}) is the checkpoint itself; choose another file name, e.g. {out.with_suffix('.onnx')}.")
    _check_replaceable(out, overwrite)
    if fmt == "onnx":
        _import_onnx_tools(need_runtime=check)

    model, cfg, ckpt = load_model(ckpt_path, device="cpu")
    module = InferenceModule.from_model(fold_batchnorm(model)).eval()
    meta = _metadata(model, cfg, ckpt, fmt, ckpt_path.name, file_fingerprint(ckpt_path))
    with torch.no_grad():
        if fmt == "onnx":
            data = _export_onnx(module, meta, opset)
            run = _onnx_runner(data) if check else None
        else:
            data = _export_torchscript(module, json.dumps(meta, allow_nan=False))
            run = _torchscript_runner(data) if check else None
        if run is not None:
            _check_outputs(run, model, fmt)
    _check_replaceable(out, overwrite)  # again: the export took a while
    write_bytes_atomic(out, data)
    return out


def load_exported_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata that [`export_model`][] stored in an ONNX or TorchScript file.

    Reads the file without running it (a TorchScript file is a zip archive; an ONNX file
    is read with the ``onnx`` package, without its weights' external data).

    Returns:
        A dict with ``cellkit_version``, ``format`` (``"onnx"`` or ``"torchscript"``),
        ``input_name`` and ``output_name`` (ONNX's tensor names), ``input`` (a sentence
        about the input), ``mean`` and ``std`` (ImageNet's, on the ``0..1`` scale: the
        input is ``(rgb / 255 - mean) / std``), ``activation`` (``"sigmoid"`` or
        ``"identity"``), ``num_classes``, ``class_names``, ``threshold`` and
        ``min_distance`` (one per class, for the peaks: a cell is a pixel whose value is
        above ``threshold[c]`` and the maximum of its ``(2 * min_distance[c] + 1)``-pixel
        window; ``None`` for a post-processor other than ``peaks``), ``exclusive``,
        ``postprocess`` (``{"name", "kwargs"}`` as cellkit runs it), ``mpp`` (micrometres per
        pixel of the training images, or ``None``), ``model``, ``encoder``, ``heads``
        (the model's heads; only ``main_head`` is exported), ``main_head``,
        ``output_stride``, ``checkpoint`` (the file's name), ``checkpoint_sha256``,
        ``torch_version`` and ``opset`` (ONNX).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when it is not a model exported by cellkit.
        ImportError: for an ONNX file when the ``onnx`` package is not installed.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"exported model {path} {what}; pass the file written by cellkit export.")
    text: str | None = None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_KEY}")]
            if names:
                text = archive.read(names[0]).decode("utf-8")
        kind = "a TorchScript archive"
    else:
        onnx = _import_onnx_tools(need_runtime=False)["onnx"]
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as err:  # protobuf raises its own DecodeError
            raise ValueError(
                f"{path} is neither a TorchScript archive nor an ONNX model ({type(err).__name__}: {err}); "
                "pass a file written by cellkit export."
            ) from None
        text = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
        kind = "an ONNX model"
    if text is None:
        raise ValueError(
            f"{path} is {kind} without cellkit's metadata ({METADATA_KEY}): expected a file written by cellkit "
            "export; export the checkpoint with `cellkit export --checkpoint best.pt --out model.onnx`."
        )
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: the {METADATA_KEY} metadata is not valid JSON ({err}); export it again.") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object as {METADATA_KEY}, got {type(meta).__name__}; export it again.")
    return meta


# --------------------------------------------------------------------------- helpers


def _resolve_format(format: str | None, out: Path) -> str:
    if out.is_dir():
        raise IsADirectoryError(
            f"--out {out} is a folder; cellkit export writes one file: give its name, ending in .onnx (ONNX) or "
            f".pt (TorchScript), e.g. --out {out / 'model.onnx'}."
        )
    if format is None:
        found = _SUFFIXES.get(out.suffix.lower())
        if found is None:
            raise ValueError(
                f"cannot tell the export format from the file name {out.name!r} (suffix {out.suffix or 'none'!r}); "
                "expected .onnx (ONNX) or .pt (TorchScript), or pass format='onnx' / 'torchscript' (--format)."
            )
        return found
    if not isinstance(format, str):
        raise ValueError(f"format must be one of {list(EXPORT_FORMATS)}, got {format!r}.")
    name: str = look_up_option(format, EXPORT_FORMATS, what="export format", normalize=True)
    return name


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file, unless asked and it is a cellkit export."""
    if out.is_dir():
        raise IsADirectoryError(f"out ({out}) is a folder; give a file name, e.g. {out / 'model.onnx'}.")
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} exists; pass overwrite=True (--overwrite) to replace it, or choose another file name."
        )
    def exported(path: Path) -> bool:
        try:
            load_exported_metadata(path)
        except (ValueError, ImportError, OSError):
            return False
        return True

    check_outputs("cellkit export", [out], ours=exported,
                  fix="it is not a model exported by cellkit, so it is not replaced even with overwrite; choose "
                      "another file name (or delete that file first if it is yours to lose)")


def _import_onnx_tools(need_runtime: bool) -> dict[str, Any]:
    """The ONNX packages, or an ImportError saying how to install them."""
    names = ("onnx", "onnxscript") + (("onnxruntime",) if need_runtime else ())
    found, missing = {}, []
    for name in names:
        try:
            found[name] = importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        hint = " (or pass check=False / --no-check to skip the check that needs onnxruntime)" if (
            missing == ["onnxruntime"]) else ""
        raise ImportError(
            f"ONNX export needs the packages {', '.join(names)}; {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install them with "
            f"pip install 'cellkit[export]'{hint}, or export TorchScript (format='torchscript', .pt)."
        )
    return found


def _per_class(value: Any, num_classes: int, integer: bool) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return per_class(value, num_classes, "min_distance" if integer else "threshold", integer=integer).tolist()


def _plain(value: Any) -> Any:
    """JSON-ready data: tensors and numpy values as lists and numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _metadata(model: nn.Module, cfg: Any, ckpt: dict[str, Any], fmt: str, ckpt_name: str, sha: str) -> dict[str, Any]:
    num_classes = int(model.num_classes)  # type: ignore[arg-type]
    kwargs = dict(ckpt.get("postprocess") or cfg.postprocess.kwargs)
    threshold, min_distance, exclusive = kwargs.get("threshold"), kwargs.get("min_distance"), kwargs.get("exclusive")
    # The values the post-processor runs with (its defaults filled in), where it has them.
    post = POSTPROCESSORS.build(cfg.postprocess.name, **kwargs)
    threshold = getattr(post, "threshold", threshold)
    min_distance = getattr(post, "min_distance", min_distance)
    exclusive = getattr(post, "exclusive", exclusive)
    names = ckpt.get("class_names") or cfg.data.class_names
    if not names or len(names) != num_classes:
        names = [f"class{i}" for i in range(num_classes)]  # as Predictor numbers them
    mpp = cfg.data.mpp
    activation = str(model.activation)
    return {
        "cellkit_version": __version__,
        "format": fmt,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input": "float32 (batch, 3, height, width) RGB images, any height and width >= 1, normalised as "
                 "(rgb / 255 - mean) / std",
        "mean": [float(v) for v in IMAGENET_MEAN],
        "std": [float(v) for v in IMAGENET_STD],
        "activation": activation,
        "output": "float32 (batch, num_classes, height, width) "
                  + ("probabilities (sigmoid)" if activation == "sigmoid" else "density maps (identity)"),
        "num_classes": num_classes,
        "class_names": [str(n) for n in names],
        "threshold": _per_class(threshold, num_classes, integer=False),
        "min_distance": _per_class(min_distance, num_classes, integer=True),
        "exclusive": None if exclusive is None else bool(exclusive),
        "postprocess": {"name": cfg.postprocess.name, "kwargs": _plain(kwargs)},
        "mpp": None if mpp is None else float(mpp),
        "model": cfg.name,
        "encoder": cfg.model.encoder,
        "heads": list(model.heads),  # type: ignore[arg-type]
        "main_head": str(model.main),
        "output_stride": int(model.output_stride),  # type: ignore[arg-type]
        "checkpoint": ckpt_name,
        "checkpoint_sha256": sha,
        "torch_version": torch.__version__.split("+")[0],
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress lines, warnings and log messages."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _failed(fmt: str, err: BaseException) -> ExportError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    tool = "torch.onnx.export(dynamo=True)" if fmt == "onnx" else "torch.jit.script"
    other = "TorchScript (format='torchscript')" if fmt == "onnx" else "ONNX (format='onnx')"
    return ExportError(
        f"{tool} could not export the model ({type(err).__name__}: {first}); a plug-in encoder or decoder "
        f"must be exportable by it. Try {other}, or run with --debug for the full error."
    )


def _export_onnx(module: nn.Module, meta: dict[str, Any], opset: int | None) -> bytes:
    example = torch.randn(*_EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))
    try:
        with _quiet():
            program = torch.onnx.export(
                module,
                (example,),
                None,
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"image": {0: "batch", 2: "height", 3: "width"}},
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
            proto = program.model_proto
    except Exception as err:  # the exporter raises many kinds
        raise _failed("onnx", err) from err
    # The output has the input's size: name its dimensions so (not the exporter's formula).
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    for index, name in ((0, "batch"), (2, "height"), (3, "width")):
        if len(dims) == 4:
            dims[index].Clear()
            dims[index].dim_param = name
    meta = {**meta, "opset": int(next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0))}
    entries = {METADATA_KEY: json.dumps(meta, allow_nan=False)}
    entries.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    del proto.metadata_props[:]
    for key, value in entries.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "cellkit"
    proto.producer_version = str(meta["cellkit_version"])
    try:
        return bytes(proto.SerializeToString())
    except ValueError as err:  # protobuf's 2 GiB limit
        raise ExportError(
            f"the ONNX model is too large for one file ({err}); export TorchScript instead (format='torchscript')."
        ) from err


def _export_torchscript(module: nn.Module, text: str) -> bytes:
    try:
        with _quiet():
            scripted = torch.jit.script(module)
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer, _extra_files={METADATA_KEY: text})
    except Exception as err:  # torch.jit raises many kinds
        raise _failed("torchscript", err) from err
    return buffer.getvalue()


def _onnx_runner(data: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])


def _torchscript_runner(data: bytes) -> Any:
    with _quiet():
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return loaded


def _check_outputs(run: Any, model: nn.Module, fmt: str, sizes: Sequence[tuple[int, int]] = _CHECK_SIZES) -> float:
    """Compare the exported model with PyTorch's inference; the largest difference."""
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for h, w in sizes:
        x = torch.randn(1, 3, h, w, generator=generator)
        expected = apply_activation(model.infer(x), str(model.activation))
        try:
            got = run(x)
        except Exception as err:  # the runtimes raise their own kinds
            raise ExportError(
                f"the exported {fmt} model fails on a {h}x{w} input ({type(err).__name__}: "
                f"{(str(err).strip().splitlines() or [''])[0]}); please report it with the checkpoint's config."
            ) from err
        if tuple(got.shape) != tuple(expected.shape):
            raise ExportError(
                f"the exported {fmt} model gives maps of shape {tuple(got.shape)} for a {h}x{w} input, expected "
                f"{tuple(expected.shape)}; please report it with the checkpoint's config."
            )
        diff = float((got.float() - expected).abs().max())
        tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
        if not diff <= tolerance:
            raise ExportError(
                f"the exported {fmt} model's maps differ from PyTorch's by {diff:.3g} on a {h}x{w} input, expected "
                f"at most {tolerance:.3g}; please report it with the checkpoint's config (check=False / --no-check "
                "writes the file anyway)."
            )
        worst = max(worst, diff)
    return worst
