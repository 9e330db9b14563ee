"""Configs round-trip; the builder checks names and wiring; presets build and train a step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import cellkit
from cellkit import CellkitConfig, ConfigError, LossSpec, TargetSpec
from cellkit.presets import PRESETS, get_preset


def tiny(cfg: CellkitConfig) -> CellkitConfig:
    """Shrink a preset so a step runs in a fraction of a second."""
    for c in (cfg, cfg.pretrain):
        if c is not None:
            c.model.encoder_kwargs["width_multiplier"] = 0.25
            c.model.decoder_kwargs.update(width=16, low_level_width=8)
    return cfg


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_round_trips_through_dict_and_yaml(name, tmp_path):
    cfg = get_preset(name, size="cpu")
    assert CellkitConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "config.yaml"
    cfg.to_yaml(path)
    assert CellkitConfig.from_yaml(path) == cfg
    assert CellkitConfig.from_yaml(path.read_text()) == cfg


def test_from_dict_reports_every_problem():
    with pytest.raises(ConfigError) as info:
        CellkitConfig.from_dict({"modle": {}, "train": {"epochs": "ten", "lrr": 0.1}})
    msg = str(info.value)
    assert "config: Unknown key 'modle'. Did you mean 'model'?" in msg
    assert "config.train.epochs: expected an integer, got 'ten'" in msg
    assert "config.train: Unknown key 'lrr'. Did you mean 'lr'?" in msg


def test_from_yaml_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CellkitConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        CellkitConfig.from_yaml("- 1\n- 2\n")


def test_builder_reports_all_wiring_problems_at_once():
    cfg = cellkit.presets.ours_plus(size="cpu")
    cfg.model.heads = ("main",)  # the dynamic head is gone, but its losses remain
    cfg.model.encoder = "resnet181"
    cfg.losses.append(LossSpec("ce", 1.0, output="main", target="nothing"))
    cfg.targets["spare"] = TargetSpec("circel")
    with pytest.raises(ConfigError) as info:
        cellkit.build_model(cfg)
    msg = str(info.value)
    assert "Unknown encoder 'resnet181'" in msg and "resnet18" in msg
    assert "output 'dynamic' is not a head of the model ['main']" in msg
    assert "against 'dynamic' is not a head" in msg
    assert "target 'nothing' is not in targets" in msg
    assert "Unknown mask generator 'circel'. Did you mean 'circle'" in msg
    assert "problem(s)" in msg


def test_builder_checks_kwargs_and_loss_reference_kind():
    cfg = cellkit.presets.ours(size="cpu")
    cfg.model.decoder_kwargs["widht"] = 3
    cfg.losses.append(LossSpec("consistency", 0.5, output="main"))
    cfg.postprocess.kwargs["treshold"] = 0.1
    problems = cellkit.builder.config_problems(cfg)
    text = "\n".join(problems)
    assert "has no argument 'widht'" in text
    assert "compares two outputs; set 'against'" in text
    assert "has no argument 'treshold'" in text


def test_prior_target_needs_a_pretrain_stage():
    cfg = cellkit.presets.ours_plus_plus(size="cpu")
    cfg.pretrain = None
    assert any("needs a stage-1 config" in p for p in cellkit.builder.config_problems(cfg))


def test_unknown_preset_and_size():
    with pytest.raises(ValueError, match="Did you mean 'ours_plus'"):
        get_preset("ours_pluss")
    with pytest.raises(ValueError, match="Unknown size 'gpu'"):
        cellkit.presets.ours(size="gpu")


def test_paper_variants_heads_and_weights():
    assert cellkit.presets.ours().model.heads == ("main",)
    assert cellkit.presets.ours_plus().model.heads == ("main", "dynamic")
    plusplus = cellkit.presets.ours_plus_plus()
    assert plusplus.model.heads == ("main", "dynamic", "prior")
    weights = {spec.resolved_label: spec.weight for spec in plusplus.losses}
    # Lt = 0.8 CE + 0.2 IoU + 0.5 Lc + 0.5 Lp + 1.0 Ld
    assert weights == {
        "main/ce": 0.8,
        "main/iou": 0.2,
        "dynamic/dynamic": 1.0,
        "main~dynamic/consistency": 0.5,
        "prior/prior": 0.5,
    }
    assert plusplus.pretrain is not None and [s.name for s in plusplus.pretrain.losses] == ["ce"]
    paper = cellkit.presets.ours_plus_plus(size="paper")
    # stage 1 stops at the paper's 10 % of stage 2 (10 of 100 epochs there; here in steps)
    assert paper.pretrain.train.steps == round(0.1 * paper.train.steps)
    assert cellkit.presets.ours(size="paper").model.encoder == "resnet101"


def test_cpu_preset_is_ten_times_cheaper_than_paper():
    from cellkit.models.flops import flops_per_megapixel

    cpu = flops_per_megapixel(cellkit.build_model(cellkit.presets.ours(size="cpu")), size=64)
    paper_cfg = cellkit.presets.ours(size="paper")
    paper = flops_per_megapixel(cellkit.build_model(paper_cfg), size=64)
    assert paper / cpu >= 10, (paper, cpu)


def test_plugin_registered_from_user_code_is_picked_up_by_the_builder():
    @cellkit.MASKS.register("test_square")
    class SquareMask:
        per_image = False

        def __init__(self, half: int = 1) -> None:
            self.half = half

        def channels(self, num_classes: int) -> int:
            return num_classes

        def __call__(self, points, classes, *, shape, num_classes, image=None, rng=None, key=None):
            points, classes = cellkit.validate_points(points, classes, shape, num_classes)
            out = np.zeros((num_classes, *shape), np.float32)
            for (x, y), c in zip(points.round().astype(int), classes):
                out[c, max(0, y - self.half): y + self.half + 1, max(0, x - self.half): x + self.half + 1] = 1
            return out

    try:
        cfg = tiny(cellkit.presets.ours(size="cpu"))
        cfg = dataclasses.replace(cfg, targets={"circle": TargetSpec("test_square", {"half": 2})})
        generators = cellkit.build_targets(cfg)
        assert isinstance(generators["circle"], SquareMask) and generators["circle"].half == 2
        bad = dataclasses.replace(cfg, targets={"circle": TargetSpec("test_square", {"halff": 2})})
        with pytest.raises(ConfigError, match="has no argument 'halff'"):
            cellkit.build_targets(bad)
    finally:
        cellkit.MASKS.unregister("test_square")


def test_build_model_from_a_model_config_reports_its_problems():
    with pytest.raises(ConfigError) as info:
        cellkit.build_model(cellkit.ModelConfig(encoder="resnet181", heads=("aux",), activation="softmax"))
    msg = str(info.value)
    assert "Unknown encoder 'resnet181'" in msg
    assert "model.heads: 'main' is required" in msg
    assert "model.activation: Unknown activation 'softmax'. Available: sigmoid, identity." in msg
    model = cellkit.build_model(cellkit.ModelConfig(encoder_kwargs={"width_multiplier": 0.25},
                                                    decoder_kwargs={"width": 16, "low_level_width": 8}))
    assert list(model.heads) == ["main"]
