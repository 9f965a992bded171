"""``dsl.losses.clip`` edges: defaults, a closed-form value, the symmetric halves, devices
(under ``torch.device("meta")``, see ``test_dual_ntxent_edges.py``)."""

from __future__ import annotations

import math

import pytest
import torch

from dsl.losses.clip import ClipLoss, clip_loss


def test_defaults():
    loss = ClipLoss()
    assert (loss.gather_with_grad, loss.local_loss, loss.temperature) == (True, True, 0.07)
    with pytest.raises(ValueError, match="^temperature must be > 0, got 0$"):
        ClipLoss(temperature=0)


def test_closed_form_and_both_directions():
    # 1 -> 2 sees [[1, 0], [1, 0]] (rows of S), 2 -> 1 its columns: the halves differ
    q1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    q2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    s = 2.0
    row = [-math.log(math.exp(s) / (math.exp(s) + 1)), -math.log(1 / (math.exp(s) + 1))]
    col = [-math.log(math.exp(s) / (2 * math.exp(s))), -math.log(1 / 2)]
    want = (sum(row) / 2 + sum(col) / 2) / 2
    assert clip_loss(q1, q2, q1, q2, 0, s).item() == pytest.approx(want, rel=1e-12)
    # the second anchor alone (first=1): its row and column only
    assert clip_loss(q1[1:], q2[1:], q1, q2, 1, s).item() == pytest.approx((row[1] + col[1]) / 2, rel=1e-12)
    assert ClipLoss(temperature=0.5)(q1, q2).item() == pytest.approx(want, rel=1e-12)


def test_everything_made_inside_is_on_the_inputs_device():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    want = ClipLoss()(z1, z2)
    with torch.device("meta"):
        got = ClipLoss()(z1, z2)
    assert got.device == z1.device and torch.equal(got, want)


def test_local_loss_scores_only_this_ranks_pairs(monkeypatch):
    # rank 1 of 3, faked as in test_gather_modes.py. The modes agree after the engine's mean
    # over ranks (test_losses.py); each rank's own value differs, so a dropped local_loss
    # (every rank silently computing the full [B, B] matrices) shows only here
    import dsl.losses.gather as G

    def gather(x, gather_with_grad):  # two other ranks' rows around ours
        return torch.cat([x.detach().flip(0), x, x.detach().roll(1, dims=1)])

    monkeypatch.setattr(G, "world", lambda: (1, 3))
    monkeypatch.setattr(G, "gather_features", gather)
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(2, 2, 4, generator=g, dtype=torch.float64)
    q1, q2 = torch.nn.functional.normalize(z1, dim=-1), torch.nn.functional.normalize(z2, dim=-1)
    k1, k2 = gather(q1, True), gather(q2, True)
    own = clip_loss(q1, q2, k1, k2, 2, 1 / 0.5)
    full = clip_loss(k1, k2, k1, k2, 0, 1 / 0.5)
    assert own.item() != pytest.approx(full.item())
    assert ClipLoss(temperature=0.5)(z1, z2).item() == pytest.approx(own.item(), rel=1e-12)
    full_mode = ClipLoss(local_loss=False, temperature=0.5)(z1, z2)
    assert full_mode.item() == pytest.approx(full.item(), rel=1e-12)
