"""Tests of cellkit.losses: hand-computed values, gradients, errors, the weighted sum, the registry contract."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellkit.losses import (
    CELoss,
    ConsistencyLoss,
    DynamicLoss,
    IoULoss,
    LossModule,
    LossTerm,
    MissingKeyError,
    MSELoss,
    PriorLoss,
    WeightedLoss,
    ce_loss,
    consistency_loss,
    dynamic_loss,
    iou_loss,
    mse_loss,
    prior_loss,
)
from cellkit.losses.functional import _norm
from cellkit.registry import LOSSES

LOG3 = math.log(3.0)  # sigmoid(log 3) = 0.75, sigmoid(-log 3) = 0.25, sigmoid(0) = 0.5


def t(values, dtype=torch.float64) -> torch.Tensor:
    """A (1, 1, 2, 2) tensor from four values (row-major)."""
    return torch.tensor(values, dtype=dtype).reshape(1, 1, 2, 2)


# Logits whose sigmoids are P = [0.5, 0.75, 0.25, 0.5], and a target G = [1, 1, 0, 0].
LOGITS = t([0.0, LOG3, -LOG3, 0.0])
PROBS = [0.5, 0.75, 0.25, 0.5]
TARGET = t([1.0, 1.0, 0.0, 0.0])
G = [1.0, 1.0, 0.0, 0.0]


def rand_inputs(shape=(2, 2, 3, 4), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen, dtype=dtype)
    target = torch.rand(shape, generator=gen, dtype=dtype)
    return logits, target


# --------------------------------------------------------------------------- hand-computed values


def test_ce_hand_value():
    expected = sum(-(g * math.log(p) + (1 - g) * math.log(1 - p)) for g, p in zip(G, PROBS)) / 4
    assert expected == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    assert ce_loss(LOGITS, TARGET).item() == pytest.approx(expected, abs=1e-12)


def test_ce_pos_weight_hand_value_per_class():
    # Two classes: class 0 weight 1, class 1 weight 3 on the positive term.
    logits = torch.cat([LOGITS, LOGITS], dim=1)
    target = torch.cat([TARGET, TARGET], dim=1)
    per_class = [
        sum(-(w * g * math.log(p) + (1 - g) * math.log(1 - p)) for g, p in zip(G, PROBS)) / 4
        for w in (1.0, 3.0)
    ]
    expected = sum(per_class) / 2
    assert ce_loss(logits, target, pos_weight=[1.0, 3.0]).item() == pytest.approx(expected, abs=1e-12)
    assert ce_loss(logits, target, pos_weight=torch.tensor([1.0, 3.0])).item() == pytest.approx(expected)
    # A scalar weight applies to every class.
    assert ce_loss(logits, target, pos_weight=3.0).item() == pytest.approx(per_class[1], abs=1e-12)


def test_iou_hand_value():
    intersection = sum(g * p for g, p in zip(G, PROBS))  # 1.25
    union = sum(G) + sum(PROBS) - intersection  # 2.75
    assert iou_loss(LOGITS, TARGET, eps=0.0).item() == pytest.approx(1 - intersection / union)
    assert 1 - intersection / union == pytest.approx(6 / 11)
    eps = 0.5
    assert iou_loss(LOGITS, TARGET, eps=eps).item() == pytest.approx(1 - (1.25 + eps) / (2.75 + eps))


def test_iou_averages_per_image_and_class_not_pooled():
    # Image 0: the hand example (6/11). Image 1: P = 0.5 everywhere, G = [1, 0, 0, 0]:
    # I = 0.5, U = 1 + 2 - 0.5 = 2.5, loss = 1 - 0.2 = 0.8.
    logits = torch.cat([LOGITS, t([0.0, 0.0, 0.0, 0.0])])
    target = torch.cat([TARGET, t([1.0, 0.0, 0.0, 0.0])])
    assert iou_loss(logits, target, eps=0.0).item() == pytest.approx((6 / 11 + 0.8) / 2)


def test_dynamic_hand_values():
    diffs = [p - g for p, g in zip(PROBS, G)]  # [-0.5, -0.25, 0.25, 0.5]
    l1 = sum(abs(d) for d in diffs) / 4
    l2 = sum(d * d for d in diffs) / 4
    smooth = sum(0.5 * d * d for d in diffs) / 4  # |d| < 1: Huber with beta=1 is 0.5 d^2
    assert (l1, l2, smooth) == pytest.approx((0.375, 0.15625, 0.078125))
    assert dynamic_loss(LOGITS, TARGET).item() == pytest.approx(l1)
    assert dynamic_loss(LOGITS, TARGET, norm="l2").item() == pytest.approx(l2)
    assert dynamic_loss(LOGITS, TARGET, norm="smooth_l1").item() == pytest.approx(smooth)


def test_norm_smooth_l1_large_difference_is_linear():
    d = torch.tensor([-3.0, 0.5, 2.0])
    assert _norm(d, "smooth_l1").tolist() == pytest.approx([2.5, 0.125, 1.5])


def test_consistency_hand_values():
    other = t([LOG3, -LOG3, -LOG3, 20.0])  # P~ = [0.75, 0.25, 0.25, sigmoid(20)]
    probs_b = [0.75, 0.25, 0.25, 1 / (1 + math.exp(-20.0))]
    diffs = [a - b for a, b in zip(PROBS, probs_b)]
    assert consistency_loss(LOGITS, other).item() == pytest.approx(sum(abs(d) for d in diffs) / 4)
    assert consistency_loss(LOGITS, other, norm="l2").item() == pytest.approx(sum(d * d for d in diffs) / 4)
    # Symmetric.
    assert consistency_loss(other, LOGITS).item() == pytest.approx(consistency_loss(LOGITS, other).item())


def test_prior_hand_value_uses_only_class_index():
    # Channel 0 holds anything (it must be ignored); channel 1 holds LOGITS.
    logits = torch.cat([t([50.0, -50.0, 7.0, 3.0]), LOGITS], dim=1)
    target = t([0.5, 1.0, 0.0, 0.25])
    expected_l1 = sum(abs(g - p) for g, p in zip([0.5, 1.0, 0.0, 0.25], PROBS)) / 4  # (0+.25+.25+.25)/4
    assert expected_l1 == pytest.approx(0.1875)
    assert prior_loss(logits, target).item() == pytest.approx(expected_l1)
    assert prior_loss(logits, target[:, 0]).item() == pytest.approx(expected_l1)  # (B, H, W) accepted
    expected_l2 = sum((g - p) ** 2 for g, p in zip([0.5, 1.0, 0.0, 0.25], PROBS)) / 4
    assert prior_loss(logits, target, norm="l2").item() == pytest.approx(expected_l2)
    # class_index=0 reads the other channel: sigmoid(±50) = 1/0, sigmoid(7), sigmoid(3).
    probs0 = [1.0, 0.0, 1 / (1 + math.exp(-7.0)), 1 / (1 + math.exp(-3.0))]
    expected0 = sum(abs(g - p) for g, p in zip([0.5, 1.0, 0.0, 0.25], probs0)) / 4
    assert prior_loss(logits, target, class_index=0).item() == pytest.approx(expected0)


def test_mse_hand_value_raw_outputs():
    pred = t([1.0, 2.0, -1.0, 0.0])
    target = t([0.0, 0.0, 0.0, 0.5])
    assert mse_loss(pred, target).item() == pytest.approx((1 + 4 + 1 + 0.25) / 4)


# --------------------------------------------------------------------------- perfect predictions


def perfect_pair():
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # (1, 2, 2, 2)
    logits = (target * 2 - 1) * 20.0  # ±20
    return logits, target


def test_perfect_predictions_give_about_zero():
    logits, target = perfect_pair()
    assert ce_loss(logits, target).item() < 1e-8
    assert iou_loss(logits, target).item() < 1e-6
    for norm in ("l1", "l2", "smooth_l1"):
        assert dynamic_loss(logits, target, norm=norm).item() < 1e-8
        assert consistency_loss(logits, logits.clone(), norm=norm).item() == 0.0
        assert prior_loss(logits, target[:, 1:], norm=norm).item() < 1e-8
    assert mse_loss(target, target).item() == 0.0


def test_iou_empty_target_and_empty_prediction_is_about_zero():
    logits = torch.full((1, 1, 2, 2), -20.0)
    assert iou_loss(logits, torch.zeros(1, 1, 2, 2)).item() < 0.01  # 4 * sigmoid(-20) << eps = 1e-6


# --------------------------------------------------------------------------- gradients


FUNCTIONS = {
    "ce": lambda x, y: ce_loss(x, y),
    "ce_pos_weight": lambda x, y: ce_loss(x, y, pos_weight=[2.0, 0.5]),
    "iou": lambda x, y: iou_loss(x, y),
    "dynamic_l1": lambda x, y: dynamic_loss(x, y, norm="l1"),
    "dynamic_l2": lambda x, y: dynamic_loss(x, y, norm="l2"),
    "dynamic_smooth_l1": lambda x, y: dynamic_loss(x, y, norm="smooth_l1"),
    "consistency_l1": lambda x, y: consistency_loss(x, torch.logit(y)),
    "consistency_l2": lambda x, y: consistency_loss(x, torch.logit(y), norm="l2"),
    "prior": lambda x, y: prior_loss(x, y[:, 1:]),
    "prior_l2": lambda x, y: prior_loss(x, y[:, :1], class_index=0, norm="l2"),
    "mse": lambda x, y: mse_loss(x, y),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_gradcheck_float64(name):
    fn = FUNCTIONS[name]
    logits, target = rand_inputs(shape=(2, 2, 3, 3), seed=1)
    target = target.clamp(0.05, 0.95)  # keep the logit of it finite; |P - G| away from 0 a.s.
    logits.requires_grad_(True)
    if name.startswith("consistency"):
        # Gradient with respect to both sides.
        other = torch.logit(target).detach().requires_grad_(True)
        norm = "l2" if name.endswith("l2") else "l1"
        assert torch.autograd.gradcheck(lambda a, b: consistency_loss(a, b, norm=norm), (logits, other))
    else:
        assert torch.autograd.gradcheck(lambda x: fn(x, target), (logits,))
    # The target side too, where it is differentiable.
    target = target.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: fn(logits.detach(), y), (target,))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_gradients_finite_for_extreme_logits(name):
    logits = torch.tensor([-200.0, -20.0, 0.0, 20.0, 200.0, 1e4]).reshape(1, 1, 2, 3).repeat(1, 2, 1, 1)
    logits.requires_grad_(True)
    target = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0, 0.0]).reshape(1, 1, 2, 3).repeat(1, 2, 1, 1)
    value = FUNCTIONS[name](logits, target.clamp(1e-4, 1 - 1e-4))
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(logits.grad).all()


def test_half_precision_inputs_are_computed_in_float32():
    logits, target = rand_inputs(shape=(1, 1, 300, 300), dtype=torch.float32)
    target = (target > 0.5).float()
    ref = iou_loss(logits, target)
    got = iou_loss(logits.half(), target.half())
    assert got.dtype == torch.float32
    assert torch.isfinite(got) and got.item() == pytest.approx(ref.item(), abs=1e-3)
    # A float64 target with float32 logits is fine too.
    assert ce_loss(logits, target.double()).dtype == torch.float32


# --------------------------------------------------------------------------- consistency stop_gradient


@pytest.mark.parametrize("side", [None, "a", "b"])
def test_consistency_stop_gradient(side):
    a, b = rand_inputs(seed=3)
    a.requires_grad_(True)
    b = b.detach().requires_grad_(True)
    consistency_loss(a, b, stop_gradient=side).backward()
    stopped = {"a": a, "b": b}.get(side)
    for name, x in (("a", a), ("b", b)):
        if x is stopped:
            assert x.grad is None or torch.count_nonzero(x.grad) == 0
        else:
            assert x.grad is not None and torch.count_nonzero(x.grad) > 0


def test_consistency_module_stop_gradient_names_prediction_a_and_reference_b():
    main, dynamic = rand_inputs(seed=4)
    main.requires_grad_(True)
    dynamic = dynamic.detach().requires_grad_(True)
    ConsistencyLoss(stop_gradient="b")(main, dynamic).backward()
    assert dynamic.grad is None
    assert main.grad is not None and torch.count_nonzero(main.grad) > 0


# --------------------------------------------------------------------------- function and module agree


MODULE_CASES = [
    (CELoss(), lambda x, y: ce_loss(x, y)),
    (CELoss(pos_weight=[2.0, 1.5]), lambda x, y: ce_loss(x, y, pos_weight=[2.0, 1.5])),
    (IoULoss(eps=0.1), lambda x, y: iou_loss(x, y, eps=0.1)),
    (DynamicLoss(norm="l2"), lambda x, y: dynamic_loss(x, y, norm="l2")),
    (ConsistencyLoss(norm="smooth_l1"), lambda x, y: consistency_loss(x, y, norm="smooth_l1")),
    (PriorLoss(class_index=0, norm="l2"), lambda x, y: prior_loss(x, y, class_index=0, norm="l2")),
    (MSELoss(), lambda x, y: mse_loss(x, y)),
]


@pytest.mark.parametrize("module, fn", MODULE_CASES, ids=lambda v: repr(v) if isinstance(v, torch.nn.Module) else "")
def test_function_and_module_agree(module, fn):
    logits, target = rand_inputs(seed=5)
    if isinstance(module, ConsistencyLoss):
        target = torch.randn_like(logits)
    if isinstance(module, PriorLoss):
        target = target[:, :1]
    assert module.reference in ("target", "output")
    assert isinstance(module, LossModule)
    torch.testing.assert_close(module(logits, target), fn(logits, target))


@pytest.mark.parametrize("name", [n for n in LOSSES.names() if LOSSES.get(n).__module__.startswith("cellkit.")])
def test_every_cellkit_loss_has_a_function_that_agrees(name):
    """Each of cellkit's registered losses is a thin module over a pure function: the
    agreement cases above must cover it (a new loss needs its function and a case)."""
    covered = {type(module) for module, _ in MODULE_CASES}
    assert LOSSES.get(name) in covered, (
        f"loss {name!r} ({LOSSES.get(name).__name__}) has no case in MODULE_CASES: add one comparing "
        "the module with its function of cellkit.losses.functional"
    )


def test_registry_holds_the_six_losses_with_their_references():
    import cellkit.losses as losses_package

    for name in ("ce", "iou", "dynamic", "consistency", "prior", "mse"):
        assert name in LOSSES
    expected = {"ce": CELoss, "iou": IoULoss, "dynamic": DynamicLoss, "consistency": ConsistencyLoss,
                "prior": PriorLoss, "mse": MSELoss}
    for name, cls in expected.items():
        assert LOSSES.get(name) is cls
        assert cls.reference == ("output" if name == "consistency" else "target")
    assert set(losses_package.__all__) >= {"WeightedLoss", "LossTerm", "LossModule", "ce_loss"}
    built = LOSSES.build("consistency", norm="l2", stop_gradient="a")
    assert (built.norm, built.stop_gradient) == ("l2", "a")


def test_ce_module_pos_weight_is_a_non_persistent_buffer():
    module = CELoss(pos_weight=[1.0, 2.0])
    assert "pos_weight" in dict(module.named_buffers())
    assert "pos_weight" not in module.state_dict()


# --------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), norm=st.sampled_from(["l1", "l2", "smooth_l1"]))
def test_property_ranges_and_symmetry(seed, norm):
    logits, target = rand_inputs(shape=(1, 2, 3, 3), seed=seed, dtype=torch.float32)
    other = torch.randn_like(logits)
    assert 0.0 <= iou_loss(logits, target).item() <= 1.0
    assert 0.0 <= dynamic_loss(logits, target, norm=norm).item() <= 1.0
    assert ce_loss(logits, target).item() >= 0.0
    ab = consistency_loss(logits, other, norm=norm).item()
    assert ab == pytest.approx(consistency_loss(other, logits, norm=norm).item(), abs=1e-6)
    assert 0.0 <= ab <= 1.0


# --------------------------------------------------------------------------- errors


def test_bad_target_shape_message():
    logits = torch.zeros(2, 2, 8, 8)
    msg = "Invalid target shape: expected (B, C, H, W) matching logits (2, 2, 8, 8), got (2, 1, 8, 8)"
    for fn in (ce_loss, iou_loss, dynamic_loss):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            fn(logits, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"Invalid target shape: expected \(B, C, H, W\) matching pred"):
        mse_loss(logits, torch.zeros(2, 2, 8, 7))
    with pytest.raises(ValueError, match=r"Invalid logits_b shape: .* matching logits_a \(2, 2, 8, 8\)"):
        consistency_loss(logits, torch.zeros(1, 2, 8, 8))


def test_bad_logits_shape_and_dtype_messages():
    with pytest.raises(ValueError, match=r"Invalid logits shape: expected \(B, C, H, W\), got \(2, 8, 8\)"):
        ce_loss(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(TypeError, match=r"Invalid logits dtype: expected a floating-point tensor, got torch.int64"):
        dynamic_loss(torch.zeros(1, 1, 2, 2, dtype=torch.long), torch.zeros(1, 1, 2, 2))
    with pytest.raises(TypeError, match=r"Invalid target dtype: .* got torch.bool; convert it with .float\(\)"):
        iou_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"Invalid logits: expected a torch.Tensor .* got ndarray"):
        import numpy as np

        ce_loss(np.zeros((1, 1, 2, 2)), torch.zeros(1, 1, 2, 2))
    with pytest.raises(TypeError, match=r"Invalid pred dtype"):
        mse_loss(torch.zeros(1, 1, 2, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2))


def test_prior_errors():
    logits = torch.zeros(2, 2, 4, 4)
    with pytest.raises(
        ValueError,
        match=r"Invalid target shape: expected \(B, 1, H, W\) matching logits \(2, 2, 4, 4\), got \(2, 2, 4, 4\)",
    ):
        prior_loss(logits, torch.zeros(2, 2, 4, 4))
    with pytest.raises(
        ValueError, match=r"Invalid class_index 2: logits have 2 channel\(s\), expected 0 <= class_index < 2"
    ):
        prior_loss(logits, torch.zeros(2, 1, 4, 4), class_index=2)
    with pytest.raises(TypeError, match="Invalid class_index: expected an int"):
        prior_loss(logits, torch.zeros(2, 1, 4, 4), class_index=1.0)
    with pytest.raises(ValueError, match="Invalid class_index"):
        PriorLoss(class_index=-1)


@pytest.mark.parametrize(
    "call",
    [
        lambda: dynamic_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), norm="L1"),
        lambda: consistency_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), norm="L1"),
        lambda: prior_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 2, 2), norm="L1"),
        lambda: _norm(torch.zeros(2), "L1"),
        lambda: DynamicLoss(norm="L1"),
        lambda: LOSSES.build("consistency", norm="L1"),
    ],
)
def test_unknown_norm_lists_choices(call):
    expected = r"Unknown norm 'L1'\. Did you mean 'l1'\? Available: l1, l2, smooth_l1\."
    with pytest.raises(ValueError, match=expected):
        call()


def test_bad_stop_gradient_eps_and_pos_weight():
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"Invalid stop_gradient 'main': expected None .*'a'.*'b'"):
        consistency_loss(x, x, stop_gradient="main")
    with pytest.raises(ValueError, match="Invalid stop_gradient"):
        ConsistencyLoss(stop_gradient=True)
    with pytest.raises(ValueError, match="Invalid eps: expected a number >= 0, got -1"):
        iou_loss(x, x, eps=-1)
    with pytest.raises(ValueError, match="Invalid eps"):
        IoULoss(eps=-1.0)
    with pytest.raises(ValueError, match=r"Invalid pos_weight shape: expected \(\) or \(C,\) = \(2,\)"):
        ce_loss(x, x, pos_weight=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"Invalid pos_weight: expected finite values > 0, got \[0.0\]"):
        CELoss(pos_weight=[0.0])


# --------------------------------------------------------------------------- weighted sum


def paper_terms(alpha=0.8, lc=0.5, lp=0.5, ld=1.0):
    """The paper's eq. 7 (Ours++)."""
    return [
        LossTerm("ce", CELoss(), alpha, output="main", target="circle"),
        LossTerm("iou", IoULoss(), 1 - alpha, output="main", target="circle"),
        LossTerm("dynamic", DynamicLoss(), ld, output="dynamic", target="random_polygon"),
        LossTerm("consistency", ConsistencyLoss(), lc, output="main", against="dynamic"),
        LossTerm("prior", PriorLoss(), lp, output="prior", target="prior"),
    ]


def batch(seed=7):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 2, 5, 6)
    outputs = {name: torch.randn(shape, generator=gen).requires_grad_(True) for name in ("main", "dynamic", "prior")}
    targets = {
        "circle": (torch.rand(shape, generator=gen) > 0.7).float(),
        "random_polygon": (torch.rand(shape, generator=gen) > 0.6).float(),
        "prior": torch.rand((2, 1, 5, 6), generator=gen),
    }
    return outputs, targets


def test_weighted_sum_equals_hand_sum_and_reports_every_label():
    loss = WeightedLoss(paper_terms())
    outputs, targets = batch()
    total, terms = loss(outputs, targets)
    assert loss.labels == ["ce", "iou", "dynamic", "consistency", "prior"]
    assert list(terms) == loss.labels
    expected_terms = {
        "ce": ce_loss(outputs["main"], targets["circle"]),
        "iou": iou_loss(outputs["main"], targets["circle"]),
        "dynamic": dynamic_loss(outputs["dynamic"], targets["random_polygon"]),
        "consistency": consistency_loss(outputs["main"], outputs["dynamic"]),
        "prior": prior_loss(outputs["prior"], targets["prior"]),
    }
    weights = {"ce": 0.8, "iou": 0.2, "dynamic": 1.0, "consistency": 0.5, "prior": 0.5}
    hand = sum(weights[k] * expected_terms[k].item() for k in weights)
    assert total.item() == pytest.approx(hand, rel=1e-6)
    for label, value in terms.items():
        assert value.ndim == 0 and not value.requires_grad
        assert value.item() == pytest.approx(expected_terms[label].item(), rel=1e-6)
    total.backward()
    for name in ("main", "dynamic", "prior"):
        assert outputs[name].grad is not None and torch.isfinite(outputs[name].grad).all()


def test_weighted_loss_required_names_and_repr():
    loss = WeightedLoss(paper_terms())
    assert loss.required_outputs == ["dynamic", "main", "prior"]
    assert loss.required_targets == ["circle", "prior", "random_polygon"]
    assert len(loss.losses) == 5
    assert "consistency: 0.5 * ConsistencyLoss(output='main', against='dynamic')" in repr(loss)


def test_weighted_loss_moves_module_buffers():
    loss = WeightedLoss([LossTerm("ce", CELoss(pos_weight=[1.0, 2.0]), 1.0, output="main", target="circle")])
    loss = loss.to(torch.float64)
    assert loss.terms[0].module.pos_weight.dtype == torch.float64


def test_missing_output_and_target_messages():
    loss = WeightedLoss(paper_terms())
    outputs, targets = batch()
    del outputs["dynamic"]
    with pytest.raises(
        KeyError,
        match=r"Loss term 'dynamic' needs output 'dynamic', missing from the model's outputs; "
        r"available: 'main', 'prior'\. Check the term's output/against",
    ):
        loss(outputs, targets)
    outputs, targets = batch()
    del targets["circle"]
    with pytest.raises(
        MissingKeyError,
        match=r"Loss term 'ce' needs target 'circle', missing from the batch's targets; "
        r"available: 'random_polygon', 'prior'\. Check the term's target",
    ):
        loss(outputs, targets)


def test_loss_term_and_weighted_loss_validation():
    with pytest.raises(
        ValueError, match=r"Loss term 'ce': CELoss scores an output against a training target; name it with target="
    ):
        LossTerm("ce", CELoss(), 1.0, output="main")
    with pytest.raises(
        ValueError, match=r"Loss term 'c': ConsistencyLoss scores an output against another output; name it with against="
    ):
        LossTerm("c", ConsistencyLoss(), 1.0, output="main", target="circle")
    with pytest.raises(ValueError, match="output and against are both 'main'"):
        LossTerm("c", ConsistencyLoss(), 1.0, output="main", against="main")
    with pytest.raises(ValueError, match=r"drop against='dynamic'"):
        LossTerm("ce", CELoss(), 1.0, output="main", target="circle", against="dynamic")
    with pytest.raises(ValueError, match=r"expected a finite weight >= 0, got -1"):
        LossTerm("ce", CELoss(), -1, output="main", target="circle")
    with pytest.raises(ValueError, match=r"reference must be 'target' or 'output', got None"):
        LossTerm("x", torch.nn.L1Loss(), 1.0, output="main", target="circle")
    term = LossTerm("ce", CELoss(), 1, output="main", target="circle")
    assert isinstance(term.weight, float)
    with pytest.raises(ValueError, match=r"labels must be unique, got \['ce'\]"):
        WeightedLoss([term, LossTerm("ce", IoULoss(), 1.0, output="main", target="circle")])
    with pytest.raises(ValueError, match="at least one LossTerm"):
        WeightedLoss([])


def test_weighted_loss_rejects_non_scalar_module():
    class PerPixel(torch.nn.Module):
        reference = "target"

        def forward(self, prediction_logits, reference):
            return (prediction_logits - reference).abs()

    loss = WeightedLoss([LossTerm("bad", PerPixel(), 1.0, output="main", target="circle")])
    with pytest.raises(
        ValueError, match=r"Loss term 'bad': PerPixel must return a scalar tensor, got \(1, 1, 2, 2\)"
    ):
        loss({"main": torch.zeros(1, 1, 2, 2)}, {"circle": torch.zeros(1, 1, 2, 2)})


# --------------------------------------------------------------------------- registry contract


def reference_for(module, logits: torch.Tensor) -> torch.Tensor:
    """A reference of the right kind for ``module`` (see LossModule.reference)."""
    gen = torch.Generator().manual_seed(11)
    if module.reference == "output":
        return torch.randn(logits.shape, generator=gen)
    if isinstance(module, PriorLoss):  # one-channel targets
        b, _, h, w = logits.shape
        return torch.rand((b, 1, h, w), generator=gen)
    return torch.rand(logits.shape, generator=gen)


def check_loss_contract(name: str) -> None:
    module = LOSSES.build(name)
    assert isinstance(module, torch.nn.Module)
    assert isinstance(module, LossModule)
    assert module.reference in ("target", "output")
    logits = torch.randn(2, 2, 9, 11, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    reference = reference_for(module, logits)
    value = module(logits, reference)
    assert isinstance(value, torch.Tensor) and value.ndim == 0
    assert torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # It works inside a WeightedLoss as well.
    kw = {"against": "other"} if module.reference == "output" else {"target": "reference"}
    total, terms = WeightedLoss([LossTerm(name, module, 2.0, output="main", **kw)])(
        {"main": logits.detach(), "other": reference}, {"reference": reference}
    )
    assert total.item() == pytest.approx(2.0 * terms[name].item(), rel=1e-6)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_follows_the_contract(name):
    check_loss_contract(name)


def test_contract_picks_up_a_new_plugin():
    @LOSSES.register("test_plugin_l1")
    class PluginL1(torch.nn.Module):
        reference = "target"

        def forward(self, prediction_logits, reference):
            return (torch.sigmoid(prediction_logits) - reference).abs().mean()

    try:
        assert "test_plugin_l1" in LOSSES.names()
        check_loss_contract("test_plugin_l1")
    finally:
        LOSSES.unregister("test_plugin_l1")
