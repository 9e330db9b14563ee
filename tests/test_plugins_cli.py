"""Plug-ins from the command line: --plugins, a YAML plugins: list, installed packages' entry points.

Tiny on purpose (2-core machines): six synthetic 96x96 images in cellkit's CSV format, a
quarter-width ResNet-18, 64-pixel crops, two steps, no calibration.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import cellkit
from cellkit.cli import main
from cellkit.plugins import ENTRY_POINT_GROUP, PluginError, load_plugins, unregistered_names

REPO = Path(__file__).resolve().parents[1]

PLUGIN = "ck_test_plugins"  # the module the tests write; its names are unique to this file
MASK, LOSS = "ck_test_disc", "ck_test_bce"

PLUGIN_CODE = '''
"""A user's plug-ins: a disc mask generator and a BCE loss, under new names."""
import numpy as np
import torch.nn.functional as F
from skimage.draw import disk
from torch import nn

from cellkit import LOSSES, MASKS
from cellkit.masks.base import check_call


@MASKS.register("{mask}")
class Disc:
    per_image = False

    def __init__(self, radius=3.0):
        self.radius = float(radius)

    def channels(self, num_classes):
        return num_classes

    def __call__(self, points, classes, *, shape, num_classes, image=None, rng=None, key=None):
        points, classes, shape, _ = check_call(points, classes, shape, num_classes, image, where="{mask}")
        out = np.zeros((num_classes, *shape), np.float32)
        for (x, y), c in zip(points, classes):
            rows, cols = disk((y, x), self.radius, shape=shape)
            out[c, rows, cols] = 1.0
        return out


@LOSSES.register("{loss}")
class BCE(nn.Module):
    reference = "target"

    def forward(self, logits, reference):
        return F.binary_cross_entropy_with_logits(logits, reference)
'''


def _unload(module: str, names: tuple[str, str]) -> None:
    """Forget a plug-in: its names leave the registries, its module sys.modules."""
    for registry, name in zip((cellkit.MASKS, cellkit.LOSSES), names):
        if name in registry:
            registry.unregister(name)
    sys.modules.pop(module, None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 96x96 images with dark nuclei of two classes, in cellkit's CSV format."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(6):
        image = np.full((96, 96, 3), 225, np.uint8)
        points = rng.uniform(6, 90, (10, 2))
        classes = rng.integers(0, 2, 10)
        for (x, y), c in zip(points, classes):
            r, col = int(y), int(x)
            image[r - 3 : r + 4, col - 3 : col + 4] = (90, 50, 130) if c else (130, 70, 50)
        Image.fromarray(image).save(root / f"img{i}.png")
        rows = "".join(f"{x:.1f},{y:.1f},{c}\n" for (x, y), c in zip(points, classes))
        (root / f"img{i}.csv").write_text("x,y,class\n" + rows)
    return root


def write_config(path: Path, data: Path, *, mask: str = MASK, loss: str = LOSS,
                 plugins: list[str] | None = None) -> Path:
    """A tiny training YAML whose target and first loss are the plug-in's."""
    cfg = cellkit.presets.ours(size="cpu")
    cfg.model.encoder_kwargs["width_multiplier"] = 0.25
    cfg.model.decoder_kwargs.update(width=16, low_level_width=8)
    t = cfg.train
    t.steps, t.val_every_steps, t.crop_size, t.batch_size, t.num_workers, t.calibrate = 2, 2, 64, 2, 0, False
    cfg.data.root, cfg.data.format, cfg.data.cell_diameter, cfg.data.val_fraction = str(data), "csv", 8.0, 0.3
    data_dict = cfg.to_dict()
    data_dict["targets"]["circle"] = {"name": mask, "kwargs": {"radius": 3.0}}
    data_dict["losses"][0]["name"] = loss
    if plugins is not None:
        data_dict = {"plugins": plugins, **data_dict}
    path.write_text(yaml.safe_dump(data_dict, sort_keys=False))
    return path


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The user's plug-in module in a folder on sys.path, not imported yet; forgotten afterwards."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / f"{PLUGIN}.py").write_text(PLUGIN_CODE.format(mask=MASK, loss=LOSS))
    monkeypatch.syspath_prepend(str(folder))
    _unload(PLUGIN, (MASK, LOSS))
    yield folder
    _unload(PLUGIN, (MASK, LOSS))


def _error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith(f"cellkit {command}: error: ")]
    assert len(errors) == 1, lines
    return errors[0]


# --------------------------------------------------------------------------- --plugins and YAML


def test_train_with_plugins_option_then_predict(plugin_dir: Path, data_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "plug.yaml", data_dir)
    run = tmp_path / "run"
    code = main(["train", "--config", str(config), "--plugins", PLUGIN, "--out", str(run), "--device", "cpu",
                 "--max-steps", "1"])
    assert code == 0, capsys.readouterr().err
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["plugins"] == [PLUGIN]  # recorded: --config of the run loads it again
    assert stored["targets"]["circle"]["name"] == MASK and stored["losses"][0]["name"] == LOSS
    assert (run / "best.pt").is_file() and (run / "curves.png").is_file()
    capsys.readouterr()

    # A checkpoint never imports anything: without the plug-in, predict names what is missing.
    _unload(PLUGIN, (MASK, LOSS))
    image = data_dir / "img0.png"
    argv = ["predict", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "pred"),
            "--device", "cpu", "--tile-size", "96", "--overlap", "0", "--no-overlay", str(image)]
    assert main(argv) == 2
    line = _error(capsys, "predict")
    assert repr(MASK) in line and repr(LOSS) in line and f"--plugins {PLUGIN}" in line
    assert PLUGIN not in sys.modules
    # With it, the same checkpoint predicts.
    assert main([*argv, "--plugins", PLUGIN]) == 0, capsys.readouterr().err
    assert (tmp_path / "pred" / "img0.csv").is_file()


def test_train_with_plugins_list_in_yaml(plugin_dir: Path, data_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "plug.yaml", data_dir, plugins=[PLUGIN])
    run = tmp_path / "run"
    # A YAML (maybe a colleague's run folder) does not import by itself: consent is asked for.
    _unload(PLUGIN, (MASK, LOSS))
    code = main(["train", "--config", str(config), "--out", str(run), "--device", "cpu", "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and PLUGIN not in sys.modules and not run.exists()
    assert f"--plugins {PLUGIN} or --trust-plugins" in err and "runs its code" in err
    code = main(["train", "--config", str(config), "--out", str(run), "--device", "cpu", "--max-steps", "1",
                 "--trust-plugins"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"cellkit: importing the plug-in {PLUGIN}" in err  # every import is printed
    assert yaml.safe_load((run / "config.yaml").read_text())["plugins"] == [PLUGIN]
    assert MASK in cellkit.MASKS and (run / "best.pt").is_file()


def test_a_config_naming_an_unloaded_plugin_says_how_to_load_it(
        plugin_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "plug.yaml", data_dir)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    line = _error(capsys, "train")
    assert f"Unknown mask generator {MASK!r}" in line and "--plugins" in line and "plugins: list" in line
    assert not (tmp_path / "run").exists()  # refused before the folder became a run
    cfg = cellkit.CellkitConfig.from_yaml(config)
    assert unregistered_names(cfg) == [("mask generator", MASK), ("loss", LOSS)]


def test_a_py_file_is_a_plugin_too_and_loads_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module, names = "ck_test_file_plugin", ("ck_test_file_disc", "ck_test_file_bce")
    file = tmp_path / "code" / f"{module}.py"
    file.parent.mkdir()
    file.write_text(PLUGIN_CODE.format(mask=names[0], loss=names[1]))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the file's folder is put on it
    try:
        assert load_plugins([str(file)], entry_points=False) == [module]
        assert names[0] in cellkit.MASKS and names[1] in cellkit.LOSSES
        # Named again (by path or by name), nothing is registered twice.
        assert load_plugins(f"{file},{module}", entry_points=False) == [module]
    finally:
        _unload(module, names)


def test_a_module_in_the_current_folder_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As with python -m: the console script does not put the current folder on sys.path itself."""
    (tmp_path / "ck_test_cwd_plugin.py").write_text("LOADED = True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        assert load_plugins(["ck_test_cwd_plugin"], entry_points=False) == ["ck_test_cwd_plugin"]
        assert sys.modules["ck_test_cwd_plugin"].LOADED
    finally:
        sys.modules.pop("ck_test_cwd_plugin", None)


# --------------------------------------------------------------------------- installed packages


def _build_distribution(tmp_path: Path, module_code: str) -> Path:
    """A real package with a cellkit.plugins entry point, built and installed by pip into a folder.

    ``pip install --target`` puts what an install makes (the module and its ``.dist-info``
    with ``entry_points.txt``) into a folder of its own, so the venv is never changed; the
    folder goes on PYTHONPATH. Without pip's build tools, the same files are written by hand.
    """
    project = tmp_path / "my-pkg"
    project.mkdir()
    (project / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "ck-test-pkg"
        version = "1.0"

        [project.entry-points."{ENTRY_POINT_GROUP}"]
        mine = "my_pkg_plugins"

        [tool.setuptools]
        py-modules = ["my_pkg_plugins"]
        """))
    (project / "my_pkg_plugins.py").write_text(module_code)
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--target", str(site), str(project)],
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:  # no setuptools here: what pip would have written
        site.mkdir(exist_ok=True)
        (site / "my_pkg_plugins.py").write_text(module_code)
        info = site / "ck_test_pkg-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ck-test-pkg\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nmine = my_pkg_plugins\n")
    assert (site / "my_pkg_plugins.py").is_file() and list(site.glob("*.dist-info/entry_points.txt"))
    return site


def test_an_installed_package_trains_from_yaml(data_dir: Path, tmp_path: Path) -> None:
    """The done-when of the issue: a plug-in from an installed package trains from YAML, in a new process."""
    names = ("ck_test_pkg_disc", "ck_test_pkg_bce")
    site = _build_distribution(tmp_path, PLUGIN_CODE.format(mask=names[0], loss=names[1]))
    config = write_config(tmp_path / "pkg.yaml", data_dir, mask=names[0], loss=names[1])
    run = tmp_path / "run"
    path = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    env.pop("CELLKIT_NO_ENTRY_POINTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cellkit", "train", "--config", str(config), "--out", str(run),
         "--device", "cpu", "--max-steps", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["targets"]["circle"]["name"] == names[0] and stored["losses"][0]["name"] == names[1]
    assert "plugins" not in stored  # an entry point is loaded by every command: nothing to record
    assert (run / "best.pt").is_file() and (run / "curves.png").is_file()
    assert "best checkpoint:" in proc.stdout


# --------------------------------------------------------------------------- errors


def test_a_missing_module_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train", "--plugins", "ck_no_such_plugin", "--out", str(tmp_path / "run")]) == 2
    line = _error(capsys, "train")
    assert "'ck_no_such_plugin'" in line and "No module named" in line
    assert "pip install" in line and "spelling of --plugins" in line
    with pytest.raises(PluginError, match="Empty plug-in name"):
        load_plugins("a,,b", entry_points=False)


def test_a_plugin_that_fails_names_itself_and_the_exception(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ck_test_broken.py").write_text("raise RuntimeError('the lab server is down')\n")
    (tmp_path / "ck_test_needs_dep.py").write_text("import ck_not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"'ck_test_broken'.*RuntimeError: the lab server is down"):
        load_plugins(["ck_test_broken"], entry_points=False)
    with pytest.raises(PluginError, match=r"'ck_test_needs_dep'.*pip install ck_not_installed_dependency"):
        load_plugins(["ck_test_needs_dep"], entry_points=False)
    assert main(["evaluate", "--plugins", "ck_test_broken", "--pred", str(tmp_path), "--data", str(tmp_path),
                 "--format", "csv"]) == 2
    assert "RuntimeError: the lab server is down" in _error(capsys, "evaluate")


def test_a_broken_entry_point_names_its_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    info = tmp_path / "ck_broken_dist-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ck-broken-dist\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = ck_gone_module:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CELLKIT_NO_ENTRY_POINTS", raising=False)
    with pytest.raises(PluginError) as caught:
        load_plugins()
    message = str(caught.value)
    assert "'ck-broken-dist' 2.0" in message and "broken = 'ck_gone_module:register'" in message
    assert "pip uninstall ck-broken-dist" in message and "No module named 'ck_gone_module'" in message
    # Every command loads the entry points, and says so in one line.
    assert main(["plot", str(tmp_path)]) == 2
    assert "ck-broken-dist" in _error(capsys, "plot")
    # The way around it until the package is fixed.
    monkeypatch.setenv("CELLKIT_NO_ENTRY_POINTS", "1")
    assert load_plugins() == []


def test_an_entry_point_function_is_called_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ck_test_ep_module.py").write_text("CALLS = []\n\ndef register():\n    CALLS.append(1)\n")
    info = tmp_path / "ck_ep_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ck-ep-dist\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nparts = ck_test_ep_module:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CELLKIT_NO_ENTRY_POINTS", raising=False)
    try:
        assert "ck_test_ep_module:register" in load_plugins()
        assert "ck_test_ep_module:register" in load_plugins()
        assert sys.modules["ck_test_ep_module"].CALLS == [1]
    finally:
        sys.modules.pop("ck_test_ep_module", None)
