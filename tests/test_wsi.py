"""Whole slides: reading (real SVS, pyramidal TIFF), pixel size, chunks and seams, resume, regions, CLI.

The model here is a fixed "stain" model (a blurred darkness map per colour) so that cells are
real nuclei of real IHC tiles and the maps are deterministic and local; one test runs the
command line with a (random) cellkit checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn

import cellkit
from cellkit.data.bundled import bundled_endonuke
from cellkit.engine.inference import InferenceModel
from cellkit.engine.predict import Predictor
from cellkit.imaging import IMAGENET_MEAN, IMAGENET_STD
from cellkit.wsi import SlideError, is_whole_slide, open_slide
from cellkit.wsi.pipeline import chunk_grid, predict_slide
from conftest import need_shared

REPO = Path(__file__).resolve().parents[1]
SVS = REPO / ".." / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
TILE = 200  # the bundled EndoNuke tiles are 200 x 200
MPP = 0.5  # the mosaic's pixel size in these tests


class StainModel(nn.Module):
    """Class 0 = blue-ish dark nuclei, class 1 = brown ones: a blurred darkness map per colour."""

    def __init__(self) -> None:
        super().__init__()
        k = torch.arange(-4, 5, dtype=torch.float32)
        g = torch.exp(-(k**2) / (2 * 2.0**2))
        self.register_buffer("kernel", (g[:, None] * g[None, :] / g.sum() ** 2)[None, None])
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x * self.std.to(x) + self.mean.to(x)
        dark = 1.0 - rgb.mean(1, keepdim=True)
        brown = (rgb[:, :1] - rgb[:, 2:3]).clamp(min=0)
        maps = torch.cat([dark * (1 - 4 * brown).clamp(min=0), dark * (4 * brown).clamp(max=1)], 1)
        blurred = nn.functional.conv2d(maps, self.kernel.expand(2, 1, 9, 9), padding=4, groups=2)
        return 12.0 * (blurred - 0.35)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": self.infer(x)}


class _Config:
    """Just what the slide pipeline reads of a checkpoint's config: the model's pixel size."""

    def __init__(self, mpp: float | None) -> None:
        self.data = type("D", (), {"mpp": mpp, "class_map": None})()
        self.postprocess = type("P", (), {"name": "peaks"})()


def stain_predictor(mpp: float | None = MPP) -> Predictor:
    import cellkit.postprocess  # noqa: F401  registers "peaks"
    from cellkit.registry import POSTPROCESSORS

    post = POSTPROCESSORS.build("peaks", threshold=0.5, min_distance=3)
    # One tile per chunk (and per mosaic): the comparisons below see the chunking alone.
    return Predictor(StainModel(), post, 2, ["negative", "positive"], tile_size=1024, overlap=16,
                     device="cpu", config=_Config(mpp))


def mosaic(cols: int = 4, rows: int = 3) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]]]:
    """Real IHC tiles of the bundled data side by side, and each tile with its offset."""
    files = sorted((bundled_endonuke() / "images").glob("*.png"))[: cols * rows]
    tiles = []
    image = np.zeros((rows * TILE, cols * TILE, 3), np.uint8)
    for i, f in enumerate(files):
        y, x = (i // cols) * TILE, (i % cols) * TILE
        tile = np.asarray(Image.open(f).convert("RGB"))
        image[y : y + TILE, x : x + TILE] = tile
        tiles.append((x, y, tile))
    return image, tiles


def write_pyramid(path: Path, levels: list[np.ndarray], mpp: float) -> Path:
    """A tiled pyramidal TIFF (one page per level) with its pixel size in the resolution tags."""
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            down = levels[0].shape[1] / level.shape[1]
            tif.write(level, tile=(128, 128), photometric="rgb", compression="deflate",
                      resolution=(1e4 / (mpp * down), 1e4 / (mpp * down)), resolutionunit="CENTIMETER",
                      subfiletype=0 if i == 0 else 1)
    return path


def as_set(points: np.ndarray, classes: np.ndarray) -> set[tuple[float, float, int]]:
    return {(round(float(x), 3), round(float(y), 3), int(c)) for (x, y), c in zip(points, classes)}


def far_from(points: np.ndarray, lines: list[float], axis: int, band: float) -> np.ndarray:
    keep = np.ones(len(points), bool)
    for v in lines:
        keep &= np.abs(points[:, axis] - v) > band
    return keep


# --------------------------------------------------------------------------- reading


@pytest.fixture(scope="module")
def svs() -> Path:
    return need_shared(SVS)


def test_real_svs_levels_mpp_and_regions(svs: Path) -> None:
    assert is_whole_slide(svs)
    with open_slide(svs) as slide:
        assert slide.vendor == "aperio" and slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499, abs=1e-3)
        assert slide.level_count >= 1 and slide.level_downsamples[0] == 1.0
        region = slide.read_region(1000, 1400, 64, 32)
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8 and region.std() > 5  # real tissue
        # Past the slide's edge: white, not black or garbage.
        edge = slide.read_region(2200, 2950, 40, 40)
        assert (edge[20:, 20:] == 255).all()
        half = slide.read(0, 0, 400, 300, scale=2.0)
        assert half.shape == (150, 200, 3)
        thumb, scale = slide.thumbnail(512)
        assert max(thumb.shape[:2]) == 512 and scale == pytest.approx(512 / 2967, rel=1e-3)
    with open_slide(svs, mpp=0.25) as slide:
        assert slide.mpp == 0.25


def test_plain_images_and_bad_files(tmp_path: Path) -> None:
    image, _ = mosaic(2, 1)
    Image.fromarray(image).save(tmp_path / "m.png")
    assert not is_whole_slide(tmp_path / "m.png")
    with open_slide(tmp_path / "m.png") as slide:
        assert slide.dimensions == (400, 200) and slide.mpp is None and slide.vendor == "image"
        np.testing.assert_array_equal(slide.read_region(10, 20, 30, 40), image[20:60, 10:40])
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide at all")
    with pytest.raises(SlideError, match="broken.svs"):
        open_slide(bad)
    with pytest.raises(FileNotFoundError, match="missing.svs"):
        open_slide(tmp_path / "missing.svs")


def test_pyramidal_tiff_levels_and_pixel_size(tmp_path: Path) -> None:
    image, _ = mosaic()
    path = write_pyramid(tmp_path / "m.tif", [image, image[::2, ::2]], MPP)
    assert is_whole_slide(path)
    with open_slide(path) as slide:
        assert slide.level_count == 2 and slide.mpp == pytest.approx(MPP)
        assert slide.best_level(1.0) == 0 and slide.best_level(2.0) == 1 and slide.best_level(3.0) == 1
        np.testing.assert_array_equal(slide.read_region(0, 0, 800, 600), image)


def test_chunk_grid_partitions_the_image() -> None:
    cores = chunk_grid(1000, 700, 256)
    cover = np.zeros((700, 1000), int)
    for x, y, w, h in cores:
        cover[y : y + h, x : x + w] += 1
    assert (cover == 1).all()
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_grid(10, 10, 0)


# --------------------------------------------------------------------------- cells on a slide


def test_slide_cells_equal_whole_image_and_tile_cells(tmp_path: Path) -> None:
    """Chunks of 256 px cut the 800 x 600 mosaic in 12; cells away from seams are the same as
    on the whole image, and, away from the tiles' own borders, as on each tile shifted."""
    image, tiles = mosaic()
    path = write_pyramid(tmp_path / "m.tif", [image, image[::2, ::2]], MPP)
    predictor = stain_predictor()
    result = predict_slide(predictor, path, tmp_path / "out", chunk_size=256, tissue=False, progress=False)
    found = result.detections
    whole = predictor.predict(image)
    assert len(whole) > 100  # real nuclei
    d = 3  # the peak distance
    seams = [256.0, 512.0]
    away = far_from(found.points, seams, 0, d + 1) & far_from(found.points, seams, 1, d + 1)
    away_whole = far_from(whole.points, seams, 0, d + 1) & far_from(whole.points, seams, 1, d + 1)
    assert as_set(found.points[away], found.classes[away]) == as_set(whole.points[away_whole],
                                                                     whole.classes[away_whole])
    # On the seams: as many cells within one or two, each within 2 px of a whole-image cell.
    assert abs(len(found) - len(whole)) <= 2
    dist = np.sqrt(((found.points[:, None] - whole.points[None]) ** 2).sum(-1)).min(1)
    assert (dist <= 2.0).mean() >= 0.99
    # Against the tiles on their own (shifted by their offsets), away from the tiles' borders
    # (where the mosaic gives context a tile lacks: the blur's reach plus the peak distance).
    band = 4 + d + 1
    for x0, y0, tile in tiles:
        det = predictor.predict(tile)
        inner = ((det.points >= band) & (det.points < TILE - band)).all(1)
        expect = as_set(det.points[inner] + [x0, y0], det.classes[inner])
        pts = found.points - [x0, y0]
        mine = ((pts >= band) & (pts < TILE - band)).all(1)
        assert as_set(found.points[mine], found.classes[mine]) == expect
    # Coordinates are inside the slide; the outputs are there and agree.
    assert (found.points >= 0).all() and (found.points[:, 0] < 800).all() and (found.points[:, 1] < 600).all()
    out = tmp_path / "out"
    rows = (out / "m.csv").read_text().strip().splitlines()
    assert rows[0] == "x,y,class,score,confidence,prob_negative,prob_positive" and len(rows) == len(found) + 1
    geo = json.loads((out / "m.geojson").read_text())
    assert len(geo["features"]) == len(found)
    assert geo["features"][0]["properties"]["objectType"] == "detection"
    summary = json.loads((out / "m.summary.json").read_text())
    assert summary["cells"] == len(found) and sum(summary["counts"].values()) == len(found)
    assert summary["index"]["class"] == "positive"
    assert summary["index"]["value"] == pytest.approx(float((found.classes == 1).mean()))
    assert Image.open(out / "m.thumbnail.png").size[0] > 0
    assert not list(out.glob(".*cellkit-parts"))  # the chunks' folder is gone once done


def test_slide_read_at_the_models_pixel_size(tmp_path: Path) -> None:
    """A 0.25 um/px scan of the mosaic gives, for a model at 0.5 um/px, the mosaic's cells at
    twice the coordinates: read from the pyramid's 0.5 um/px level, or resampled from level 0."""
    image, _ = mosaic(2, 2)
    double = image.repeat(2, axis=0).repeat(2, axis=1)  # every pixel 2 x 2: exactly `image` at scale 2
    predictor = stain_predictor(MPP)
    expect = predict_slide(predictor, write_pyramid(tmp_path / "a.tif", [image], MPP), tmp_path / "a",
                           tissue=False, progress=False, chunk_size=150).detections
    for name, levels in (("pyramid", [double, image]), ("flat", [double])):
        path = write_pyramid(tmp_path / f"{name}.tif", levels, MPP / 2)
        result = predict_slide(predictor, path, tmp_path / name, tissue=False, progress=False, chunk_size=150)
        assert result.scale == pytest.approx(2.0)
        got = result.detections
        # Model pixel j covers scan pixels 2j, 2j+1: its centre is at 2j + 0.5.
        assert as_set(got.points, got.classes) == as_set(expect.points * 2 + 0.5, expect.classes)
        summary = json.loads((tmp_path / name / f"{name}.summary.json").read_text())
        assert summary["mpp"] == pytest.approx(MPP / 2) and summary["model_mpp"] == MPP


def test_unknown_pixel_size_warns_and_reads_level_zero(tmp_path: Path) -> None:
    image, _ = mosaic(1, 1)
    Image.fromarray(image).save(tmp_path / "t.png")
    with pytest.warns(UserWarning, match="records no pixel size"):
        result = predict_slide(stain_predictor(MPP), tmp_path / "t.png", tmp_path / "o", tissue=False,
                               progress=False)
    assert result.scale == 1.0


class _Dies:
    """A predictor that stops (as a killed process would) after ``n`` chunks."""

    def __init__(self, predictor: Predictor, n: int) -> None:
        self.inner, self.n, self.calls = predictor, n, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict(self, image: np.ndarray) -> Any:
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt("killed")
        return self.inner.predict(image)


def test_interrupted_slide_resumes_where_it_stopped(tmp_path: Path) -> None:
    image, _ = mosaic()
    path = write_pyramid(tmp_path / "m.tif", [image], MPP)
    kwargs: dict[str, Any] = {"chunk_size": 200, "tissue": False, "progress": False}
    full = predict_slide(stain_predictor(), path, tmp_path / "full", **kwargs)
    dying = _Dies(stain_predictor(), 5)
    with pytest.raises(KeyboardInterrupt):
        predict_slide(dying, path, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out" / "m.csv").exists()
    assert len(list((tmp_path / "out" / ".m.cellkit-parts").glob("chunk-*.npz"))) == 5
    counting = _Dies(stain_predictor(), 10**6)
    resumed = predict_slide(counting, path, tmp_path / "out", resume=True, **kwargs)
    assert counting.calls == full.chunks - 5 and resumed.chunks_resumed == 5
    assert as_set(resumed.detections.points, resumed.detections.classes) == as_set(
        full.detections.points, full.detections.classes)
    assert (tmp_path / "out" / "m.csv").read_text() != ""
    # Other settings do not resume silently.
    dying = _Dies(stain_predictor(), 2)
    with pytest.raises(KeyboardInterrupt):
        predict_slide(dying, path, tmp_path / "again", **kwargs)
    with pytest.raises(ValueError, match="other settings.*chunk_size"):
        predict_slide(stain_predictor(), path, tmp_path / "again", resume=True, **{**kwargs, "chunk_size": 300})
    other = stain_predictor()
    other.runner = InferenceModel(other.model, "cpu", "bf16")  # chunks of another arithmetic are not mixed in either
    with pytest.raises(ValueError, match="other settings.*precision"):
        predict_slide(other, path, tmp_path / "again", resume=True, **kwargs)


def test_a_failure_in_the_peaks_thread_stops_the_slide_and_keeps_the_finished_chunks(tmp_path: Path) -> None:
    # On the CPU a chunk's peaks run in a thread beside the network on the next chunk: an
    # error there must reach the caller, and the chunks saved before it must be whole.
    image, _ = mosaic()
    path = write_pyramid(tmp_path / "m.tif", [image], MPP)
    kwargs: dict[str, Any] = {"chunk_size": 200, "tissue": False, "progress": False}
    full = predict_slide(stain_predictor(), path, tmp_path / "full", **kwargs)
    predictor = stain_predictor()

    class Failing:  # the same peaks (and settings), failing on the fourth chunk
        def __init__(self, peaks: Any) -> None:
            self.peaks, self.calls = peaks, 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.peaks, name)

        def __call__(self, maps: Any) -> Any:
            self.calls += 1
            if self.calls == 4:
                raise MemoryError("peaks ran out")
            return self.peaks(maps)

    predictor.postprocess = Failing(predictor.postprocess)
    with pytest.raises(MemoryError, match="peaks ran out"):
        predict_slide(predictor, path, tmp_path / "out", **kwargs)
    parts = sorted((tmp_path / "out" / ".m.cellkit-parts").glob("chunk-*.npz"))
    assert len(parts) == 3 and not (tmp_path / "out" / "m.csv").exists()
    resumed = predict_slide(stain_predictor(), path, tmp_path / "out", resume=True, **kwargs)
    assert resumed.chunks_resumed == 3
    assert as_set(resumed.detections.points, resumed.detections.classes) == as_set(
        full.detections.points, full.detections.classes)


def test_regions_count_only_inside_each(tmp_path: Path) -> None:
    image, _ = mosaic()
    path = write_pyramid(tmp_path / "m.tif", [image], MPP)
    predictor = stain_predictor()
    everything = predict_slide(predictor, path, tmp_path / "all", tissue=False, progress=False).detections
    regions = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [400, 0], [400, 300],
                                                                           [0, 300], [0, 0]]]},
         "properties": {"objectType": "annotation", "name": "top left"}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[500, 350], [790, 350],
                                                                           [790, 590], [500, 590], [500, 350]]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
    ]}
    (tmp_path / "regions.geojson").write_text(json.dumps(regions))
    result = predict_slide(predictor, path, tmp_path / "r", regions=tmp_path / "regions.geojson", tissue=False,
                           progress=False)
    p = everything.points
    in_a = (p[:, 0] <= 400) & (p[:, 1] <= 300)
    in_b = (p[:, 0] >= 500) & (p[:, 0] <= 790) & (p[:, 1] >= 350) & (p[:, 1] <= 590)
    assert len(result.detections) == int((in_a | in_b).sum())
    by_name = {r["name"]: r for r in result.summary["regions"]}
    assert by_name["top left"]["cells"] == int(in_a.sum())
    assert by_name["Tumor"]["cells"] == int(in_b.sum())
    assert by_name["top left"]["area_mm2"] == pytest.approx(400 * 300 * MPP**2 / 1e6)
    # QuPath's positivity names in the GeoJSON of a slide; the summary keeps the model's.
    named = predict_slide(predictor, path, tmp_path / "q", regions=tmp_path / "regions.geojson", tissue=False,
                          progress=False, geojson_names=["Negative", "Positive"])
    features = json.loads((tmp_path / "q" / "m.geojson").read_text())["features"]
    assert len(features) == len(named.detections)
    assert [f["properties"]["classification"]["name"] for f in features] == \
        [["Negative", "Positive"][c] for c in named.detections.classes]
    assert set(named.summary["counts"]) == set(predictor.class_names)
    # Densities over the tissue inside the regions (tissue=False: all of it), the slide's too.
    inside = (400 * 300 + 290 * 240) * MPP**2 / 1e6
    assert result.summary["tissue_area_mm2"] == pytest.approx(inside, rel=0.05)
    assert result.summary["cells_per_mm2"]["all"] == pytest.approx(len(result.detections) / inside, rel=0.05)


def test_tiles_without_tissue_inside_a_chunk_are_not_run(tmp_path: Path) -> None:
    """One chunk holding tissue and glass: only the tissue's tiles go through the model."""
    tissue_part, _ = mosaic(4, 3)  # 800 x 600 of real IHC tiles
    image = np.full((600, 1600, 3), 255, np.uint8)  # and as much glass on the right
    image[:, :800] = tissue_part
    path = write_pyramid(tmp_path / "half.tif", [image, image[::4, ::4]], MPP)

    class Counting(StainModel):
        tiles = 0

        def infer(self, x: torch.Tensor) -> torch.Tensor:
            type(self).tiles += x.shape[0]
            return super().infer(x)

    def predictor() -> Predictor:
        p = stain_predictor()
        return Predictor(Counting(), p.postprocess, 2, p.class_names, tile_size=128, overlap=16,
                         device="cpu", config=p.config)

    everything = predict_slide(predictor(), path, tmp_path / "all", tissue=False, chunk_size=2048,
                               progress=False)
    all_tiles, Counting.tiles = Counting.tiles, 0
    skipped = predict_slide(predictor(), path, tmp_path / "tissue", chunk_size=2048, progress=False)
    assert everything.chunks == skipped.chunks == 1
    assert 0 < Counting.tiles < 0.7 * all_tiles  # the glass's tiles were not run
    inside = everything.detections.points[:, 0] < 800 - 64
    assert as_set(everything.detections.points[inside], everything.detections.classes[inside]) <= as_set(
        skipped.detections.points, skipped.detections.classes)
    assert len(skipped.detections) >= inside.sum() > 500


def test_tissue_mask_skips_background_on_the_real_slide(svs: Path, tmp_path: Path) -> None:
    predictor = stain_predictor(None)
    with pytest.warns(UserWarning, match="model records no pixel size"):
        result = predict_slide(predictor, svs, tmp_path / "o", chunk_size=512, progress=False)
    total = len(chunk_grid(2220, 2967, 512))
    assert 0 < result.chunks < total  # tissue found, and not everywhere
    pts = result.detections.points
    assert len(pts) > 0 and (pts >= -0.5).all() and (pts[:, 0] < 2220).all() and (pts[:, 1] < 2967).all()
    summary = result.summary
    assert 0 < summary["tissue_area_mm2"] < 2220 * 2967 * 0.499**2 / 1e6
    assert summary["cells_per_mm2"]["all"] == pytest.approx(summary["cells"] / summary["tissue_area_mm2"])


# --------------------------------------------------------------------------- the command line


def test_cli_predicts_a_slide_and_refuses_to_overwrite(tmp_path: Path) -> None:
    from cellkit.cli import main
    from cellkit.engine.checkpoint import save_checkpoint

    cfg = cellkit.presets.ours(size="cpu")
    cfg.model.encoder_kwargs["width_multiplier"] = 0.125
    cfg.model.decoder_kwargs.update(width=8, low_level_width=8)
    cfg.data.mpp = MPP
    torch.manual_seed(0)
    model = cellkit.build_model(cfg)
    ckpt = save_checkpoint(tmp_path / "best.pt", {"config": cfg.to_dict(), "model": model.state_dict(),
                                                  "class_names": ["negative", "positive"]})
    image, _ = mosaic(2, 2)
    slide = write_pyramid(tmp_path / "s.tif", [image.repeat(2, 0).repeat(2, 1), image], MPP / 2)
    out = tmp_path / "out"
    args = ["predict", str(slide), "--checkpoint", str(ckpt), "--out", str(out), "--threshold", "0.3",
            "--no-tissue-mask", "--chunk-size", "256", "--device", "cpu"]
    assert main(args) == 0
    for name in ("s.csv", "s.geojson", "s.summary.json", "s.summary.csv", "s.thumbnail.png", "counts.csv"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "predict.json").read_text())
    assert meta["status"] == "done" and meta["slides"] == ["s"]
    rows = (out / "s.csv").read_text().strip().splitlines()[1:]
    xy = np.array([[float(v) for v in r.split(",")[:2]] for r in rows]).reshape(-1, 2)
    assert (xy >= 0).all() and (xy < 800).all()  # slide (level-0) coordinates of the 800 x 800 scan
    assert main(args) == 2  # an earlier run: neither --resume nor --overwrite (an error, exit 2)
    assert main([*args, "--overwrite"]) == 0


def test_evaluate_radius_in_micrometres(tmp_path: Path) -> None:
    from cellkit.cli import _radius_in_pixels, _UsageError, build_parser

    def radius(*extra: str) -> float:
        args = build_parser().parse_args(["evaluate", "--pred", str(tmp_path), "--data", str(tmp_path),
                                          "--format", "csv", *extra])
        return _radius_in_pixels(args)

    assert radius() == 6.0 and radius("--radius", "8") == 8.0
    assert radius("--radius", "3um", "--mpp", "0.5") == pytest.approx(6.0)
    with pytest.raises(ValueError, match="needs the images' pixel size"):
        radius("--radius", "3um")
    (tmp_path / "predict.json").write_text(json.dumps({"inputs": [], "mpp": 0.25}))
    assert radius("--radius", "3um") == pytest.approx(12.0)  # the prediction run's pixel size
    with pytest.raises(_UsageError, match="positive length"):
        radius("--radius", "0um")


def test_predict_slide_never_replaces_files_unasked(tmp_path: Path) -> None:
    image, _ = mosaic(1, 1)
    path = write_pyramid(tmp_path / "m.tif", [image], MPP)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.csv").write_text("x,y,class\n1,2,0\n")  # the user's annotations of m.tif
    kwargs: dict[str, Any] = {"tissue": False, "progress": False}
    with pytest.raises(FileExistsError, match="m.csv exists"):
        predict_slide(stain_predictor(), path, out, **kwargs)
    assert (out / "m.csv").read_text() == "x,y,class\n1,2,0\n"
    assert not (out / "m.geojson").exists()  # refused before any work
    predict_slide(stain_predictor(), path, out, overwrite=True, **kwargs)
    assert (out / "m.csv").read_text().startswith("x,y,class,score")
