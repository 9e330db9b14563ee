"""Contract tests for cellkit.models: every registered encoder and decoder, the model, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from cellkit.models import (
    Decoder,
    DeepLabV3PlusDecoder,
    Encoder,
    MultiDecoderModel,
    flops_per_megapixel,
    load_torchvision_weights,
    resnet18,
    resnet101,
)
from cellkit.registry import DECODERS, ENCODERS

TINY = 0.25  # width multiplier for fast CPU tests
HEADS = ("main", "dynamic", "prior")


def tiny_encoder(name: str = "resnet18", **kw):
    return ENCODERS.build(name, width_multiplier=TINY, **kw)


def tiny_decoder(enc, num_classes: int = 2, name: str = "deeplabv3plus"):
    return DECODERS.build(
        name,
        encoder_channels=enc.channels,
        encoder_strides=enc.strides,
        num_classes=num_classes,
        width=16,
        low_level_width=8,
    )


def tiny_model(heads=HEADS, num_classes: int = 2, **enc_kw) -> MultiDecoderModel:
    torch.manual_seed(0)
    enc = tiny_encoder(**enc_kw)
    return MultiDecoderModel(enc, {h: tiny_decoder(enc, num_classes) for h in heads})


def torchvision_resnet_keys(layers, bottleneck: bool) -> set[str]:
    """The state-dict keys of torchvision's ResNet without ``fc``, written out by hand."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight"} | {f"bn1.{p}" for p in bn}
    n_conv = 3 if bottleneck else 2
    for stage, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            prefix = f"layer{stage}.{b}"
            for i in range(1, n_conv + 1):
                keys.add(f"{prefix}.conv{i}.weight")
                keys |= {f"{prefix}.bn{i}.{p}" for p in bn}
            if b == 0 and (stage > 1 or bottleneck):
                keys.add(f"{prefix}.downsample.0.weight")
                keys |= {f"{prefix}.downsample.1.{p}" for p in bn}
    return keys


# --- encoders -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_contract(name):
    enc = tiny_encoder(name).eval()
    assert isinstance(enc, Encoder) and isinstance(enc, torch.nn.Module)
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        feats = enc(x)
    assert len(feats) == len(enc.channels) == len(enc.strides) == 4
    assert enc.strides == (4, 8, 16, 16)
    for f, c, s in zip(feats, enc.channels, enc.strides):
        assert f.shape == (1, c, math.ceil(37 / s), math.ceil(53 / s))
        assert torch.isfinite(f).all()


@pytest.mark.parametrize("os_, strides", [(16, (4, 8, 16, 16)), (8, (4, 8, 8, 8))])
def test_output_stride_strides(os_, strides):
    enc = tiny_encoder(output_stride=os_).eval()
    assert enc.strides == strides
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [64 // s for s in strides]
    model = tiny_model(heads=("main",), output_stride=os_)
    assert model.output_stride == os_
    assert model(torch.randn(1, 3, 29, 31))["main"].shape == (1, 2, 29, 31)


@pytest.mark.parametrize("bad", [4, 32, 12])
def test_unsupported_output_stride(bad):
    with pytest.raises(ValueError, match="output_stride must be 16"):
        resnet18(output_stride=bad, width_multiplier=TINY)


def test_width_multiplier_and_in_channels():
    assert resnet18(width_multiplier=0.5).channels == (32, 64, 128, 256)
    assert resnet18().channels == (64, 128, 256, 512)
    assert ENCODERS.build("resnet50", width_multiplier=TINY).channels == (64, 128, 256, 512)
    enc = resnet18(in_channels=1, width_multiplier=TINY)
    assert enc.conv1.weight.shape[1] == 1
    assert enc(torch.randn(1, 1, 32, 32))[0].shape[1] == 16
    with pytest.raises(ValueError, match="width_multiplier"):
        resnet18(width_multiplier=0)


def test_resnet18_torchvision_key_names():
    keys = set(resnet18(width_multiplier=TINY).state_dict())
    assert len(keys) == 120  # torchvision's resnet18 has 122 keys, 2 of them fc.*
    assert keys == torchvision_resnet_keys((2, 2, 2, 2), bottleneck=False)
    for name in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.num_batches_tracked",
        "layer4.1.bn2.running_var",
    ):
        assert name in keys
    assert not any(k.startswith("fc.") for k in keys)
    assert "layer1.0.downsample.0.weight" not in keys


def test_resnet101_torchvision_key_names():
    enc = resnet101()  # full width, constructed only
    keys = set(enc.state_dict())
    assert len(keys) == 624  # torchvision's resnet101: 626 keys, 2 of them fc.*
    assert keys == torchvision_resnet_keys((3, 4, 23, 3), bottleneck=True)
    assert enc.state_dict()["layer3.22.conv3.weight"].shape == (1024, 256, 1, 1)
    assert enc.channels == (256, 512, 1024, 2048)


# --- weights --------------------------------------------------------------------------


def test_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    src = resnet18(width_multiplier=TINY)
    state = dict(src.state_dict())
    state["fc.weight"] = torch.zeros(1000, 128)  # a classifier, as torchvision saves it
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    dst = resnet18(width_multiplier=TINY, weights=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    # Also via the registry, with a pathlib path, and through the explicit function.
    ENCODERS.build("resnet18", width_multiplier=TINY, weights=path)
    load_torchvision_weights(resnet18(width_multiplier=TINY), path)


def test_weights_without_num_batches_tracked(tmp_path):
    src = resnet18(width_multiplier=TINY)
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    dst = resnet18(width_multiplier=TINY, weights=str(tmp_path / "old.pth"))
    assert torch.equal(dst.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var)


def test_weights_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resnet18(width_multiplier=TINY, weights=str(path))


def test_weights_wrong_keys(tmp_path):
    state = dict(resnet18(width_multiplier=TINY).state_dict())
    state["layer1.0.conv1.wieght"] = state.pop("layer1.0.conv1.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        resnet18(width_multiplier=TINY, weights=str(tmp_path / "bad.pth"))
    msg = str(err.value)
    assert "missing keys (1): layer1.0.conv1.weight" in msg
    assert "unexpected keys (1): layer1.0.conv1.wieght" in msg


def test_weights_shape_mismatch_and_wrong_depth(tmp_path):
    torch.save(resnet18(width_multiplier=0.5).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="shape mismatches"):
        resnet18(width_multiplier=TINY, weights=str(tmp_path / "wide.pth"))
    torch.save(resnet18(width_multiplier=TINY).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="missing keys"):
        ENCODERS.build("resnet34", width_multiplier=TINY, weights=str(tmp_path / "r18.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        resnet18(width_multiplier=TINY, weights=str(tmp_path / "list.pth"))


def test_weights_that_do_not_fit_leave_the_encoder_unchanged(tmp_path):
    state = dict(resnet18(width_multiplier=TINY).state_dict())
    state["conv1.weight"] = torch.zeros(8, 3, 5, 5)  # one wrong shape among weights that fit
    torch.save(state, tmp_path / "bad.pth")
    encoder = resnet18(width_multiplier=TINY)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_torchvision_weights(encoder, tmp_path / "bad.pth")
    assert "shape mismatches (1): conv1.weight: file (8, 3, 5, 5) vs model (16, 3, 7, 7)" in str(err.value)
    assert "missing keys" not in str(err.value)  # a wrong shape is reported once
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- decoders -------------------------------------------------------------------------


@pytest.mark.parametrize("name", DECODERS.names())
@pytest.mark.parametrize("num_classes", [1, 3])
def test_decoder_contract(name, num_classes):
    enc = tiny_encoder().eval()
    dec = tiny_decoder(enc, num_classes, name).eval()
    assert isinstance(dec, Decoder) and isinstance(dec, torch.nn.Module)
    assert dec.num_classes == num_classes
    with torch.no_grad():
        feats = enc(torch.randn(2, 3, 64, 96))
        out = dec(feats)
    assert out.shape == (2, num_classes, 16, 24)  # stride 4


def test_decoder_rates_scale_with_output_stride():
    assert tiny_decoder(tiny_encoder(output_stride=16)).rates == (6, 12, 18)
    assert tiny_decoder(tiny_encoder(output_stride=8)).rates == (12, 24, 36)


def test_decoder_errors():
    with pytest.raises(ValueError, match="equal length"):
        DeepLabV3PlusDecoder((16, 32), (4,), num_classes=2)
    dec = DeepLabV3PlusDecoder((8, 16), (4, 16), num_classes=2, width=8)
    with pytest.raises(ValueError, match="expected 2 encoder features"):
        dec([torch.zeros(1, 8, 8, 8)])


# --- the multi-decoder model ----------------------------------------------------------


def test_three_heads_forward_backward_odd_size():
    model = tiny_model().train()
    x = torch.randn(2, 3, 45, 61)
    out = model(x)
    assert list(out) == list(HEADS) == list(model.heads)
    for logits in out.values():
        assert logits.shape == (2, 2, 45, 61)
    sum(v.square().mean() for v in out.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.num_classes == 2 and model.output_stride == 16


def test_infer_equals_forward_main_in_eval():
    model = tiny_model().eval()
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        full = model(x)
        main = model.infer(x)
        only = model(x, heads=["main"])
    assert main.shape == (1, 2, 37, 53)
    assert list(only) == ["main"]
    torch.testing.assert_close(main, full["main"])
    torch.testing.assert_close(only["main"], full["main"])


def test_batch_one_train_mode():
    model = tiny_model().train()
    for shape in [(1, 3, 33, 47), (1, 3, 16, 16), (1, 3, 5, 7)]:  # the last is smaller than the pad
        out = model(torch.randn(*shape))
        assert all(v.shape == (1, 2, *shape[-2:]) for v in out.values())
        out["main"].mean().backward()


def test_exact_multiple_and_odd_sizes():
    model = tiny_model(heads=("main",)).eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert model.infer(x).shape == (1, 2, 48, 64)
        assert model.infer(x[..., :45, :61]).shape == (1, 2, 45, 61)


def test_model_input_and_head_errors():
    model = tiny_model(heads=("main", "dynamic"))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\) float images, got \(3, 32, 32\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="expected \\(B, 3, H, W\\)"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="float images"):
        model.infer(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="Did you mean 'dynamic'"):
        model(torch.randn(1, 3, 32, 32), heads=["dynamc"])
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="main='main' is not one of"):
        MultiDecoderModel(enc, {"aux": tiny_decoder(enc)})
    with pytest.raises(ValueError, match="at least one"):
        MultiDecoderModel(enc, {})


def test_model_accepts_module_dict_and_custom_main():
    enc = tiny_encoder()
    decs = torch.nn.ModuleDict({"a": tiny_decoder(enc, 3), "b": tiny_decoder(enc, 1)})
    model = MultiDecoderModel(enc, decs, main="b").eval()
    assert model.heads == ("a", "b") and model.num_classes == 1
    with torch.no_grad():
        assert model.infer(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)
        assert model(torch.randn(1, 3, 32, 32))["a"].shape == (1, 3, 32, 32)


# --- FLOPs ----------------------------------------------------------------------------


def test_flops_per_megapixel():
    model = tiny_model().train()
    small = flops_per_megapixel(model, size=64)
    large = flops_per_megapixel(model, size=128)
    assert small > 0 and isinstance(small, float)
    assert abs(large - small) / large < 0.05  # convolutions scale with pixels
    assert model.training  # mode restored
    # Only the main head counts: a one-head model costs the same.
    one = tiny_model(heads=("main",))
    assert flops_per_megapixel(one, size=64) == pytest.approx(small)
    with pytest.raises(ValueError, match="size"):
        flops_per_megapixel(model, size=0)
