"""``cellkit export``: ONNX and TorchScript files that compute what PyTorch computes, at any size.

Each exported file is compared with the PyTorch model's inference maps (``sigmoid(model.infer(x))``,
or ``model.infer(x)`` for a density model) on odd sizes that differ from the export's example,
down to images smaller than the padding. ONNX runs in ONNX Runtime, a dev dependency: without
it the ONNX tests fail, saying how to install it, rather than being skipped.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import cellkit
from cellkit.builder import apply_activation
from cellkit.cli import main
from cellkit.engine.checkpoint import load_model, save_checkpoint
from cellkit.export import EXPORT_FORMATS, ExportError, InferenceModule, export_model, load_exported_metadata
from cellkit.imaging import IMAGENET_MEAN, IMAGENET_STD
from cellkit.models.fuse import fold_batchnorm

# torch.jit.load and torch.jit.script warn that TorchScript is deprecated: it is one of the two formats.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")

TOLERANCE = 1e-4
ODD = st.integers(0, 80).map(lambda k: 2 * k + 1)  # odd sizes 1..161
CALIBRATED = {"threshold": [0.35, 0.6], "min_distance": [2, 4], "exclusive": True}


def onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as err:  # a dev dependency: fail, do not skip
        pytest.fail(f"onnxruntime is not installed ({err}); it is a dev dependency of cellkit: "
                    "pip install -e '.[dev]' (or '.[export]')", pytrace=False)
    return ort


def tiny_config(preset: str = "ours") -> cellkit.CellkitConfig:
    cfg = cellkit.presets.get_preset(preset, size="cpu")
    cfg.model.encoder_kwargs["width_multiplier"] = 0.125
    cfg.model.decoder_kwargs.update(width=8, low_level_width=8)
    return cfg


def make_checkpoint(folder: Path, preset: str, mpp: float | None = 0.5) -> Path:
    torch.manual_seed(0)
    cfg = tiny_config(preset)
    cfg.data.mpp = mpp
    model = cellkit.build_model(cfg)
    # Non-trivial BatchNorm statistics, so that folding them is tested too.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.8, 1.2)
            m.bias.data.uniform_(-0.1, 0.1)
    state = {"config": cfg.to_dict(), "model": model.state_dict(), "class_names": ["negative", "positive"]}
    if preset != "fcrn":
        state["postprocess"] = dict(CALIBRATED)  # thresholds calibrated at training time
    return save_checkpoint(folder / f"{preset}.pt", state)


class Exported:
    """An exported file with a runner: ``run(x) -> maps`` as a torch tensor."""

    def __init__(self, path: Path, checkpoint: Path) -> None:
        self.path = path
        self.checkpoint = checkpoint
        self.model, self.cfg, _ = load_model(checkpoint)
        if path.suffix == ".onnx":
            ort = onnxruntime()
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.session = session
            self.run = lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        else:
            self.run = torch.jit.load(str(path))

    def expected(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return apply_activation(self.model.infer(x), self.model.activation)

    def max_difference(self, h: int, w: int, batch: int = 1, seed: int = 0) -> float:
        x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
        expected = self.expected(x)
        with torch.no_grad():
            got = self.run(x)
        assert tuple(got.shape) == (batch, self.model.num_classes, h, w)
        return float((got - expected).abs().max())


class Exports:
    """``(preset, format) -> Exported``, each exported on first use (so TorchScript needs no ONNX tools).

    ``("ours", "onnx")`` is exported by the command line (``cellkit.cli.main``), end to end; the
    others with :func:`export_model`.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.done: dict[tuple[str, str], Exported] = {}

    def __getitem__(self, key: tuple[str, str]) -> Exported:
        if key not in self.done:
            preset, fmt = key
            if fmt == "onnx":
                onnxruntime()
            ckpt = self.folder / f"{preset}.pt"
            if not ckpt.exists():
                make_checkpoint(self.folder, preset, mpp=None if preset == "fcrn" else 0.5)
            out = self.folder / f"{preset}_{fmt}{'.onnx' if fmt == 'onnx' else '.pt'}"
            if key == ("ours", "onnx"):
                assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
            else:
                assert export_model(ckpt, out, fmt) == out
            self.done[key] = Exported(out, ckpt)
        return self.done[key]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return Exports(tmp_path_factory.mktemp("export"))


@pytest.fixture
def folder(exported: Exports) -> Path:
    return exported.folder


CASES = [(p, f) for p in ("ours", "ours_plus_plus", "fcrn") for f in EXPORT_FORMATS]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@settings(max_examples=4, deadline=None)
@given(h=ODD, w=ODD, batch=st.integers(1, 2), seed=st.integers(0, 2**16))
@example(h=97, w=131, batch=1, seed=0)
@example(h=201, w=77, batch=2, seed=1)
@example(h=1, w=1, batch=1, seed=2)
def test_exported_maps_match_pytorch(exported: Exports, case: tuple[str, str], h: int, w: int, batch: int,
                                     seed: int) -> None:
    e = exported[case]
    difference = e.max_difference(h, w, batch, seed)
    scale = 1.0 if e.model.activation == "sigmoid" else max(1.0, float(e.expected(torch.zeros(1, 3, 9, 9)).abs().max()))
    assert difference <= TOLERANCE * scale, f"{case} at {h}x{w}: max difference {difference:.3g}"


def test_only_the_main_head_is_exported(exported: Exports) -> None:
    e = exported["ours_plus_plus", "onnx"]
    assert e.model.heads == ("main", "dynamic", "prior")
    assert [o.name for o in e.session.get_outputs()] == ["maps"]
    assert e.session.get_outputs()[0].shape == ["batch", 2, "height", "width"]
    assert e.session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    assert load_exported_metadata(e.path)["heads"] == ["main", "dynamic", "prior"]
    # the TorchScript module holds one decoder, no auxiliary head
    names = {n for n, _ in exported["ours_plus_plus", "torchscript"].run.named_children()}
    assert names == {"encoder", "decoder"}


def test_batchnorm_is_folded(exported: Exports) -> None:
    scripted = exported["ours", "torchscript"].run
    assert not any("BatchNorm" in m.original_name for m in scripted.modules())


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_metadata_round_trips(exported: Exports, fmt: str) -> None:
    meta = load_exported_metadata(exported["ours", fmt].path)
    assert meta["format"] == fmt and meta["cellkit_version"] == cellkit.__version__
    assert meta["class_names"] == ["negative", "positive"] and meta["num_classes"] == 2
    assert meta["threshold"] == [0.35, 0.6] and meta["min_distance"] == [2, 4] and meta["exclusive"] is True
    assert meta["postprocess"] == {"name": "peaks", "kwargs": CALIBRATED}
    assert meta["mpp"] == 0.5
    assert meta["mean"] == list(IMAGENET_MEAN) and meta["std"] == list(IMAGENET_STD)
    assert meta["activation"] == "sigmoid" and meta["input_name"] == "image" and meta["output_name"] == "maps"
    assert meta["checkpoint"] == "ours.pt" and len(meta["checkpoint_sha256"]) == 16


def test_metadata_of_a_density_model(exported: Exports) -> None:
    e = exported["fcrn", "torchscript"]
    meta = load_exported_metadata(e.path)
    assert meta["activation"] == "identity" and meta["mpp"] is None
    threshold = e.cfg.postprocess.kwargs["threshold"]
    assert meta["threshold"] == [threshold, threshold] and threshold > 1  # a density threshold, per class
    # ... and TorchScript's own reader finds the same document
    extra = {"cellkit.json": ""}
    torch.jit.load(str(e.path), _extra_files=extra)
    import json

    assert json.loads(extra["cellkit.json"]) == meta


def test_onnx_metadata_is_readable_by_onnxruntime(exported: Exports) -> None:
    e = exported["ours", "onnx"]
    custom = e.session.get_modelmeta().custom_metadata_map
    import json

    assert json.loads(custom["cellkit.json"]) == load_exported_metadata(e.path)
    assert json.loads(custom["threshold"]) == [0.35, 0.6] and custom["model"] == "ours"


def test_inference_module_matches_the_model() -> None:
    torch.manual_seed(0)
    model = cellkit.build_model(tiny_config()).eval()
    module = InferenceModule.from_model(fold_batchnorm(model))
    with torch.no_grad():
        for h, w in ((5, 40), (16, 16), (33, 17), (1, 64)):
            x = torch.randn(2, 3, h, w)
            assert torch.allclose(module(x), torch.sigmoid(model.infer(x)), atol=1e-5)
    with pytest.raises(TypeError, match="MultiDecoderModel"):
        InferenceModule.from_model(torch.nn.Conv2d(3, 2, 1))


def test_refuses_to_overwrite(exported: Exports, folder: Path) -> None:
    e = exported["ours", "torchscript"]
    before = e.path.read_bytes()
    with pytest.raises(FileExistsError, match=f"{e.path.name} exists.*overwrite"):
        export_model(e.checkpoint, e.path)
    assert e.path.read_bytes() == before
    # overwrite replaces an earlier export ...
    assert export_model(e.checkpoint, e.path, overwrite=True) == e.path
    assert load_exported_metadata(e.path)["format"] == "torchscript"
    # ... never another file, nor the checkpoint itself
    other = folder / "notes.pt"
    other.write_text("mine")
    with pytest.raises(FileExistsError, match="not a model exported by cellkit"):
        export_model(e.checkpoint, other, overwrite=True)
    assert other.read_text() == "mine"
    ckpt_bytes = e.checkpoint.read_bytes()
    with pytest.raises(ValueError, match="checkpoint itself"):
        export_model(e.checkpoint, e.checkpoint, "torchscript", overwrite=True)
    assert e.checkpoint.read_bytes() == ckpt_bytes
    # no temporary file is left beside the outputs
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_bad_format_and_options(exported: Exports, folder: Path) -> None:
    ckpt = exported["ours", "torchscript"].checkpoint
    with pytest.raises(ValueError, match="export format.*onnx"):
        export_model(ckpt, folder / "m.onnx", "tensorflow")
    with pytest.raises(ValueError, match="cannot tell the export format.*'.bin'"):
        export_model(ckpt, folder / "m.bin")
    with pytest.raises(ValueError, match="opset is for ONNX"):
        export_model(ckpt, folder / "m.pt", opset=18)
    with pytest.raises(ValueError, match="opset must be an integer >= 18"):
        export_model(ckpt, folder / "m.onnx", opset=11)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_model(folder / "missing.pt", folder / "m.pt")
    assert not (folder / "m.onnx").exists() and not (folder / "m.pt").exists()


def test_load_exported_metadata_errors(folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_exported_metadata(folder / "nothing.onnx")
    archive = folder / "plain.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("m/data.pkl", b"")
    with pytest.raises(ValueError, match="without cellkit's metadata"):
        load_exported_metadata(archive)
    junk = folder / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot a model")
    with pytest.raises(ValueError, match="neither a TorchScript archive nor an ONNX model"):
        load_exported_metadata(junk)


def test_export_failure_is_an_export_error(folder: Path, exported: Exports, monkeypatch) -> None:
    import cellkit.export as export

    def broken(module: object) -> object:
        raise RuntimeError("cannot script this")

    ckpt = exported["ours", "torchscript"].checkpoint  # exported before torch.jit.script breaks
    monkeypatch.setattr(export.torch.jit, "script", broken)
    with pytest.raises(ExportError, match="torch.jit.script could not export.*cannot script this.*ONNX"):
        export_model(ckpt, folder / "broken.pt")
    assert not (folder / "broken.pt").exists()


def test_cli_export(exported: Exports, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(exported["fcrn", "torchscript"].checkpoint)
    out = folder / "cli" / "fcrn.ts"  # the folder is created
    capsys.readouterr()
    assert main(["export", "--checkpoint", ckpt, "--format", "torchscript", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "TorchScript" in lines[0], lines
    assert load_exported_metadata(out)["model"] == "fcrn"
    # a second run is refused, in one line, and --overwrite replaces the file
    assert main(["export", "--checkpoint", ckpt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cellkit export: error: ") and "--overwrite" in err[0]
    assert main(["export", "--checkpoint", ckpt, "--out", str(out), "--overwrite", "--no-check"]) == 0
    assert "not checked" in capsys.readouterr().out
    assert main(["export", "--checkpoint", ckpt, "--out", str(folder / "x.onnx"), "--format", "onx"]) == 2
    assert "Did you mean 'onnx'" in capsys.readouterr().err


def test_cli_export_onnx(exported: Exports) -> None:
    """The command-line ONNX export (``exported["ours", "onnx"]``) wrote a checked ONNX file."""
    meta = load_exported_metadata(exported["ours", "onnx"].path)
    assert meta["format"] == "onnx" and meta["opset"] >= 18


def test_peaks_on_the_exported_maps_match_cellkit(exported: Exports) -> None:
    """The recipe of docs/export.md (maximum filter, stored thresholds, one point per plateau) finds
    cellkit's cells, without cellkit."""
    from scipy import ndimage

    from cellkit.postprocess.peaks import peaks

    e = exported["ours", "onnx"]
    meta = load_exported_metadata(e.path)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    x = (image / 255.0 - np.array(meta["mean"])) / np.array(meta["std"])
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    maps = e.session.run(None, {meta["input_name"]: x})[0][0]
    found = set()
    for c, (t, d) in enumerate(zip(meta["threshold"], meta["min_distance"])):
        peak = (maps[c] == ndimage.maximum_filter(maps[c], size=2 * d + 1, mode="nearest")) & (maps[c] > t)
        labels, n = ndimage.label(peak, structure=np.ones((3, 3)))
        for row, col in ndimage.center_of_mass(peak, labels, range(1, n + 1)):
            found.add((round(col), round(row), c))
    det = peaks(maps, meta["threshold"], meta["min_distance"], exclusive=False)
    expected = {(round(x_), round(y_), int(c)) for (x_, y_), c in zip(det.points.tolist(), det.classes.tolist())}
    assert len(expected) > 5 and found == expected
