"""Shipped models (offline, from the package) and starting a training from trained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cellkit
from cellkit.engine.checkpoint import save_checkpoint
from cellkit.zoo import MODELS, initial_weights, resolve_checkpoint


def tiny(num_classes: int = 2, preset: str = "ours") -> cellkit.CellkitConfig:
    cfg = getattr(cellkit.presets, preset)(size="cpu", num_classes=num_classes)
    cfg.model.encoder_kwargs["width_multiplier"] = 0.125
    cfg.model.decoder_kwargs.update(width=8, low_level_width=8)
    return cfg


def saved(tmp_path: Path, cfg: cellkit.CellkitConfig, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = cellkit.build_model(cfg)
    return save_checkpoint(tmp_path / f"m{seed}.pt", {"config": cfg.to_dict(), "model": model.state_dict()}), model


def test_initial_weights_same_classes_copies_everything(tmp_path: Path) -> None:
    path, source = saved(tmp_path, tiny())
    torch.manual_seed(1)
    model = cellkit.build_model(tiny())
    report = initial_weights(model, path)
    assert not report.remade and len(report.copied) == len(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name


def test_initial_weights_other_classes_keeps_encoder_and_remakes_heads(tmp_path: Path) -> None:
    path, source = saved(tmp_path, tiny(2))
    torch.manual_seed(1)
    model = cellkit.build_model(tiny(3, "ours_plus_plus"))  # 3 classes, and heads the source has not
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = initial_weights(model, path)
    state = model.state_dict()
    for name in state:
        if name.startswith("encoder."):
            assert torch.equal(state[name], source.state_dict()[name]), name
    assert "decoders.main.classifier.weight" in report.remade
    assert torch.equal(state["decoders.main.classifier.weight"], fresh["decoders.main.classifier.weight"])
    assert any(n.startswith("decoders.prior.") for n in report.remade)
    assert "copied" in report.summary() and "decoders.main" in report.summary()


def test_initial_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    other = tiny()
    other.model.encoder_kwargs["width_multiplier"] = 0.25
    path, _ = saved(tmp_path, other)
    with pytest.raises(ValueError, match="does not fit this model"):
        initial_weights(cellkit.build_model(tiny()), path)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path / "nothing.pt")
    assert "endonuke-epithelium" in MODELS


def test_predict_with_a_shipped_model_and_train_from_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model NAME` and `--init-from NAME` through the command line, with a stand-in shipped model."""
    import json

    import numpy as np
    from PIL import Image

    import cellkit.zoo as zoo
    from cellkit.cli import main
    from cellkit.data.bundled import bundled_endonuke

    weights = tmp_path / "weights"
    weights.mkdir()
    cfg = tiny()
    path, _ = saved(weights, cfg)
    path.rename(weights / "endonuke-epithelium.pt")
    (weights / "endonuke-epithelium.md").write_text("# card\n")
    monkeypatch.setattr(zoo, "_resource", lambda name: weights / name)
    assert zoo.available() == ["endonuke-epithelium"] and zoo.model_card("endonuke-epithelium") == "# card\n"
    tile = sorted((bundled_endonuke() / "images").glob("*.png"))[0]
    Image.open(tile).convert("RGB").save(tmp_path / "tile.png")
    assert main(["predict", "--model", "endonuke-epithelium", "--out", str(tmp_path / "out"), "--device", "cpu",
                 str(tmp_path / "tile.png")]) == 0
    meta = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert meta["checkpoint"] == "endonuke-epithelium"

    from cellkit.models.quantize import int8_available

    assert meta["precision"] == ("int8" if int8_available() else "fp32")  # "auto" on the CPU (a ResNet here)
    predictor = cellkit.pretrained("endonuke-epithelium", device="cpu")
    assert predictor.num_classes == 2 and isinstance(predictor.predict(np.zeros((40, 40, 3), np.uint8)),
                                                     cellkit.Detections)
    # Fine-tuning from it: the first line of the run says what was copied.
    yaml_cfg = tiny()
    yaml_cfg.train.steps, yaml_cfg.train.val_every_steps, yaml_cfg.train.batch_size = 2, 2, 2
    yaml_cfg.train.crop_size, yaml_cfg.train.calibrate = 64, False
    yaml_cfg.to_yaml(tmp_path / "c.yaml")
    # Both --model and --checkpoint: a usage error (exit 2).
    assert main(["predict", "--model", "x", "--checkpoint", "y", "--out", "o", "i.png"]) == 2
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"),
                 "--init-from", "endonuke-epithelium", "--device", "cpu"]) == 0
    stored = (tmp_path / "run" / "config.yaml").read_text()
    assert "init_from: endonuke-epithelium" in stored
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_checkpoint("endonuke-epithelum")


# Bundled tiles from the three ranges of ids. The shipped model trained on every bundled tile
# (its card reports the across-region figures of its recipe), so this checks the packaged
# weights, not how well they transfer.
TILES = ["391", "4654", "4770", "550", "602", "641", "668", "773", "1030"]


def test_the_shipped_model_works_offline() -> None:
    """The weights inside the package load on a fresh install, record their pixel size and find the cells."""
    from cellkit.data import load_dataset
    from cellkit.data.bundled import bundled_endonuke
    from cellkit.metrics import evaluate

    assert "endonuke-epithelium" in cellkit.zoo.available()
    card = cellkit.model_card("endonuke-epithelium")
    assert "CC BY 4.0" in card and "never saw" in card and "2c82b4e" in card and "0.5 um per pixel" in card
    predictor = cellkit.pretrained("endonuke-epithelium", device="cpu")
    assert predictor.class_names == ["other", "epithelium"]
    assert predictor.config.data.mpp == 0.5 and predictor.config.model.encoder == "efficientnet_lite0"
    assert "weights" not in predictor.config.model.encoder_kwargs  # needs no ImageNet file to predict
    # As cellkit predict --model runs it: precision "auto", which keeps float32 for a model with
    # depthwise convolutions (their int8 kernels are slower on the CPU).
    assert predictor.precision == "fp32"
    assert cellkit.pretrained("endonuke-epithelium", device="cpu", precision="fp32").precision == "fp32"
    weights = torch.load(cellkit.zoo.model_path("endonuke-epithelium"), weights_only=True)["model"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    samples = [s for s in load_dataset(bundled_endonuke(), "endonuke", class_map="endonuke_epithelium")
               if s.key in TILES]
    assert len(samples) == len(TILES)
    report = evaluate([predictor.predict(s.image) for s in samples], [(s.points, s.classes) for s in samples],
                      radius=6.0, num_classes=2)
    # On all 251 tiles (its training data) 0.85 / 0.75; across regions 0.83 / 0.70.
    assert report.total_f1[0] > 0.7 and report.total_f1[1] > 0.6, report.total_f1
