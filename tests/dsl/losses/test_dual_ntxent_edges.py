"""``dsl.losses.dual_ntxent`` edges: defaults, exact messages, the temperature, devices.

Device: every tensor the loss makes itself must live on its inputs' device. Under
``torch.device("meta")`` (the default device for factory calls) a tensor made without naming
the device lands on ``meta`` and the CPU loss fails, so this shows on a machine without GPUs.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsl.losses.dual_ntxent import (
    MAX_LOGIT_SCALE,
    DualNTXentLoss,
    check_pair,
    check_temperature,
    inverse_temperature,
)


def test_defaults():
    loss = DualNTXentLoss()
    assert (loss.temperature, loss.gather_with_grad, loss.local_loss) == (0.07, True, True)


def test_temperature_scales_the_logits():
    # two orthogonal pairs: every similarity is 0 or 1, so the loss is known in closed form
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = 0.5
    # anchor z1[0]: positive z2[0] (s=1), negatives z1[1] (0), z2[1] (0)
    want = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert DualNTXentLoss(t)(z1, z1.clone()).item() == pytest.approx(want, rel=1e-12)
    assert inverse_temperature(None, 0.25) == 4.0
    s = torch.tensor([math.log(3.0)])
    assert inverse_temperature(s, 0.25).item() == pytest.approx(3.0)
    assert DualNTXentLoss(9.0)(z1, z1.clone(), torch.tensor([math.log(1 / t)], dtype=torch.float64)).item() == (
        pytest.approx(want, rel=1e-12))


def test_messages():
    with pytest.raises(ValueError) as e:
        check_pair(torch.zeros(2, 3), torch.zeros(3, 3))
    assert str(e.value) == "expected two [b, d] tensors of equal shape, got (2, 3) and (3, 3)"
    with pytest.raises(ValueError) as e:
        check_pair(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))  # equal, but not [b, d]
    assert str(e.value) == "expected two [b, d] tensors of equal shape, got (2, 3, 1) and (2, 3, 1)"
    check_pair(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError) as e:
        inverse_temperature(torch.zeros(2), 0.1)
    assert str(e.value) == "logit_scale must hold one value (shape [1]), got shape (2,)"
    inverse_temperature(torch.zeros(1, 1), 0.1)  # one value in any shape is accepted
    for bad in (0, -0.5, float("nan")):
        with pytest.raises(ValueError) as e:
            check_temperature(bad)
        assert str(e.value) == f"temperature must be > 0, got {bad}"
    check_temperature(0.5)
    check_temperature(1e-9)


def test_everything_made_inside_is_on_the_inputs_device():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    want = DualNTXentLoss(0.3)(z1, z2)
    with torch.device("meta"):
        got = DualNTXentLoss(0.3)(z1, z2)
    assert got.device == z1.device and torch.equal(got, want)


def test_a_learned_scale_is_clamped_to_1_and_100():
    # the bound lives in the forward (see inverse_temperature): below 0 and above log(100) the
    # scale stays at the bound and the parameter gets no gradient
    for raw, want in ((-2.0, 1.0), (0.0, 1.0), (math.log(1000.0), 100.0), (50.0, 100.0)):
        s = torch.tensor([raw], dtype=torch.float64, requires_grad=True)
        got = inverse_temperature(s, 0.25)
        assert got.item() == pytest.approx(want, rel=1e-12)
        got.sum().backward()
        assert s.grad.item() == (0.0 if raw < 0 or raw > MAX_LOGIT_SCALE else pytest.approx(want))
    assert MAX_LOGIT_SCALE == math.log(100)
