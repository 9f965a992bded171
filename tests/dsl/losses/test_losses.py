"""Contrastive losses: the formulas, and exact parity of every distributed mode with one process.

Parity: two gloo ranks hold different inputs (different seeds and scales) fed through the same
tiny float64 towers; after all-reducing the loss and the gradients with a MEAN (what
DeepSpeed/DDP do), both must equal one process running the concatenated global batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dsl.losses.gather as gather_module
from dsl.contracts.config import LossConfig
from dsl.data import augment
from dsl.losses import (
    ClipLoss,
    DualNTXentLoss,
    MMALoss,
    SimCLRLoss,
    build_loss,
    gather_features,
)
from dsl.losses.gather import gather_features as plain_gather
from dsl.losses.mma import sample_locations

WORLD = 2
B, IN_DIM, EMB = 3, 6, 5  # pairs per rank, input width, embedding width
MAP_C, MAP_HW, NUM_LOCATIONS = 4, 3, 4  # MMA: channels, map side, sampled locations (of 9)
VIEW_C, VIEW_HW = 3, 4  # SimCLR: bands and side of the augmented images
TEMPERATURE = 0.2
MODES = [(True, True), (True, False), (False, False)]  # (gather_with_grad, local_loss)
CASES = [  # (loss, learnable logit_scale)
    ("dual_ntxent", False),
    ("dual_ntxent", True),
    ("clip", True),
    ("simclr", True),
    ("mma", True),
]


def _loss(name: str, gather_with_grad: bool, local_loss: bool) -> nn.Module:
    mode = {"gather_with_grad": gather_with_grad, "local_loss": local_loss}
    if name == "mma":
        return MMALoss(NUM_LOCATIONS, TEMPERATURE, **mode)
    return build_loss(LossConfig(name=name, temperature=TEMPERATURE, **mode))


class _Towers(nn.Module):
    """The same init on every rank: two projections (one shared for SimCLR) and a logit_scale."""

    def __init__(self, name: str):
        super().__init__()
        torch.manual_seed(0)
        if name == "mma":
            self.p1, self.p2 = nn.Conv2d(MAP_C, EMB, 1), nn.Conv2d(MAP_C, EMB, 1)
        elif name == "simclr":
            self.p1 = nn.Linear(VIEW_C * VIEW_HW**2, EMB)
            self.p2 = self.p1  # one modality, one tower
        else:
            self.p1, self.p2 = nn.Linear(IN_DIM, EMB), nn.Linear(IN_DIM, EMB)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.1)))
        self.double()

    def forward(self, x1, x2):
        return self.p1(x1), self.p2(x2)


def _rank_inputs(name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rank-specific inputs: another seed and another scale on each rank."""
    g = torch.Generator().manual_seed(100 + rank)
    scale = 1.0 + 2.0 * rank
    kw = {"generator": g, "dtype": torch.float64}
    if name == "mma":
        shape = (B, MAP_C, MAP_HW, MAP_HW)
        locations = sample_locations(B, MAP_HW, MAP_HW, NUM_LOCATIONS, generator=g)
        return scale * torch.randn(shape, **kw), scale * torch.randn(shape, **kw), locations
    if name == "simclr":
        x = scale * torch.randn(B, VIEW_C, VIEW_HW, VIEW_HW, **kw)
        return augment(x, g).flatten(1), augment(x, g).flatten(1), None
    return scale * torch.randn(B, IN_DIM, **kw), scale * torch.randn(B, IN_DIM, **kw), None


def _loss_and_grads(name, learnable, mode, inputs, loss_fn=None):
    model = _Towers(name)
    loss_fn = loss_fn or _loss(name, *mode)
    x1, x2, locations = inputs
    z1, z2 = model(x1, x2)
    logit_scale = model.logit_scale if learnable else None
    extra = {"locations": locations} if name == "mma" else {}
    loss = loss_fn(z1, z2, logit_scale, **extra)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _single(name, learnable, mode=(True, True)):
    """One process, no process group, on the concatenation of every rank's inputs."""
    parts = [_rank_inputs(name, r) for r in range(WORLD)]
    inputs = tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True))
    return _loss_and_grads(name, learnable, mode, inputs)


_original_gather_for_loss = gather_module.gather_for_loss


def _rank_parity(name, learnable, mode, reduce="mean", force_mode=None, unscaled=False):
    """Runs in each rank: local loss and grads, all-reduced the way the engine does (MEAN)."""
    loss_fn = _loss(name, *mode)
    if force_mode is not None:  # bypass the constructor's refusal to show why it refuses
        loss_fn.gather_with_grad, loss_fn.local_loss = force_mode
    if unscaled:  # full-matrix mode without the xR gradient scaling
        gather_module.gather_for_loss = plain_gather
    try:
        loss, grads = _loss_and_grads(
            name, learnable, mode, _rank_inputs(name, dist.get_rank()), loss_fn
        )
    finally:
        gather_module.gather_for_loss = _original_gather_for_loss
    for t in [loss, *grads.values()]:
        dist.all_reduce(t)
        if reduce == "mean":
            t /= dist.get_world_size()
    return loss, grads


def _assert_same(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    assert grads.keys() == want_grads.keys()
    for k in grads:
        torch.testing.assert_close(
            grads[k], want_grads[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}"
        )


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"grad={m[0]}-local={m[1]}")
@pytest.mark.parametrize(
    ("name", "learnable"), CASES, ids=[f"{n}{'-learnable' if lt else ''}" for n, lt in CASES]
)
def test_distributed_matches_single_process(gloo_pool, name, learnable, mode):
    want = _single(name, learnable)
    # Every parameter got a gradient: two towers (one for SimCLR) and maybe logit_scale.
    assert len(want[1]) == (4 if name != "simclr" else 2) + learnable
    for got in gloo_pool.run(_rank_parity, name, learnable, mode):
        _assert_same(got, want)


def test_parity_check_catches_mistakes(gloo_pool):
    want = _single("dual_ntxent", True)
    summed = gloo_pool.run(_rank_parity, "dual_ntxent", True, (True, True), reduce="sum")[0]
    with pytest.raises(AssertionError):
        _assert_same(summed, want)
    unscaled = gloo_pool.run(_rank_parity, "dual_ntxent", True, (False, False), unscaled=True)[0]
    with pytest.raises(AssertionError):
        _assert_same(unscaled, want)
    # The refused mode gets the value right but loses the cross-rank gradient terms.
    forced = gloo_pool.run(
        _rank_parity, "dual_ntxent", True, (True, True), force_mode=(False, True)
    )[0]
    torch.testing.assert_close(forced[0], want[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(AssertionError):
        _assert_same(forced, want)


def _rank_gather():
    rank = dist.get_rank()
    x = torch.full((2, 3), float(rank), dtype=torch.float64, requires_grad=True)
    weight = torch.full((4, 3), rank + 1.0, dtype=torch.float64)
    gathered = gather_features(x, gather_with_grad=False)
    (gathered * weight).sum().backward()
    grad_without = x.grad.clone()
    x.grad = None
    (gather_features(x, gather_with_grad=True) * weight).sum().backward()
    return gathered.detach(), grad_without, x.grad


def test_gather_features(gloo_pool):
    for rank, (gathered, grad_without, grad_with) in enumerate(gloo_pool.run(_rank_gather)):
        assert gathered.tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 2  # rank order
        assert (grad_without == rank + 1).all()  # only this rank's own weight
        assert (grad_with == 1 + 2).all()  # both ranks' weights for this slot


def test_gather_without_process_group_is_identity():
    x = torch.randn(3, 2)
    assert gather_features(x, True) is x and gather_features(x, False) is x


def _naive_ntxent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        den = sum(math.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
        total -= math.log(math.exp(z[i] @ z[pos] / t) / den)
    return total / n2


def _naive_clip(z1, z2, t):
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = len(z1)
    total = 0.0
    for i in range(n):
        for a, b in ((z1, z2), (z2, z1)):
            den = sum(math.exp(a[i] @ b[k] / t) for k in range(n))
            total -= math.log(math.exp(a[i] @ b[i] / t) / den)
    return total / (2 * n)


def test_dual_ntxent_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    loss = DualNTXentLoss(0.5)
    assert loss(z1, z2).item() == pytest.approx(_naive_ntxent(z1, z2, 0.5), rel=1e-12)
    logit_scale = torch.tensor([math.log(1 / 0.3)], dtype=torch.float64)  # overrides 0.5
    assert loss(z1, z2, logit_scale).item() == pytest.approx(_naive_ntxent(z1, z2, 0.3), rel=1e-12)


def test_clip_and_mma_match_naive_loop():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    logit_scale = torch.tensor([math.log(1 / 0.3)], dtype=torch.float64)
    assert ClipLoss()(z1, z2, logit_scale).item() == pytest.approx(
        _naive_clip(z1, z2, 0.3), rel=1e-12
    )
    # MMA with every location = CLIP over all location vectors of all images.
    f1, f2 = torch.randn(2, 4, 2, 3, generator=g), torch.randn(2, 4, 2, 3, generator=g)
    flat = [f.permute(0, 2, 3, 1).reshape(-1, 4).double() for f in (f1, f2)]
    got = MMALoss(num_locations=6, temperature=0.3)(f1, f2).item()
    assert got == pytest.approx(_naive_clip(*flat, 0.3), rel=1e-5)


@pytest.mark.parametrize("cls", [DualNTXentLoss, ClipLoss])
def test_gradients_match_finite_differences(cls):
    # Guards the in-place masking and the query-side scaling of the logits.
    g = torch.Generator().manual_seed(6)
    z1, z2 = (torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in "12")
    logit_scale = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cls(local_loss=False), (z1, z2, logit_scale))
    assert torch.autograd.gradcheck(cls(), (z1, z2))


def test_half_precision_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(7)
    z1, z2 = torch.randn(2, 8, 16, generator=g)
    for loss in (DualNTXentLoss(), ClipLoss()):
        low = loss(z1.bfloat16(), z2.bfloat16())
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(loss(z1, z2).item(), rel=2e-2)


def test_aligned_embeddings_beat_random():
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(16, 32, generator=g)
    aligned = z1 + 0.01 * torch.randn(16, 32, generator=g)
    unrelated = torch.randn(16, 32, generator=g)
    for loss in (DualNTXentLoss(), ClipLoss()):
        assert loss(z1, aligned) < loss(z1, unrelated) - 1.0


def test_loss_at_random_init_is_near_log_of_candidates():
    # Random high-dim embeddings are near-orthogonal, so every candidate is as likely as the
    # positive: NT-Xent ~ log(2N - 1), CLIP ~ log(N) (plus ~1 / (2 t^2 d) from the spread).
    n, d = 32, 4096
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert DualNTXentLoss()(z1, z2).item() == pytest.approx(math.log(2 * n - 1), abs=0.1)
    assert ClipLoss()(z1, z2).item() == pytest.approx(math.log(n), abs=0.1)


def test_modes_agree_on_one_process():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    for cls in (DualNTXentLoss, ClipLoss, SimCLRLoss):
        values = [cls(gather_with_grad=gw, local_loss=ll)(z1, z2) for gw, ll in MODES]
        assert all(torch.equal(v, values[0]) for v in values)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DualNTXentLoss(gather_with_grad=False, local_loss=True),
        lambda: SimCLRLoss(gather_with_grad=False, local_loss=True),
        lambda: ClipLoss(gather_with_grad=False, local_loss=True),
        lambda: MMALoss(gather_with_grad=False, local_loss=True),
        lambda: build_loss(LossConfig(gather_with_grad=False, local_loss=True)),
    ],
)
def test_refused_mode_raises(make):
    with pytest.raises(ValueError, match="local_loss=True needs gather_with_grad=True"):
        make()


def test_bad_arguments_raise():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="temperature"):
        DualNTXentLoss(temperature=0)
    with pytest.raises(ValueError, match="equal shape"):
        DualNTXentLoss()(z, torch.randn(5, 8))
    with pytest.raises(ValueError, match="logit_scale"):
        ClipLoss()(z, z, torch.zeros(2))
    with pytest.raises(ValueError, match="aligned"):
        MMALoss()(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 2, 3))
    with pytest.raises(ValueError, match="num_locations"):
        MMALoss(num_locations=0)


def test_sample_locations():
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    loc = sample_locations(8, 4, 5, 6, generator=g())
    assert loc.shape == (8, 6) and loc.min() >= 0 and loc.max() < 20
    assert all(len(set(row.tolist())) == 6 for row in loc)
    assert torch.equal(loc, sample_locations(8, 4, 5, 6, generator=g()))
    assert sample_locations(2, 2, 3, 16).tolist() == [list(range(6))] * 2


def test_augment():
    x = torch.randn(6, 13, 16, 16)
    a = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(0)))
    assert not torch.allclose(a, augment(x, torch.Generator().manual_seed(1)))
    assert not torch.allclose(a, x)
    non_square = torch.randn(2, 2, 8, 12)
    assert augment(non_square, torch.Generator().manual_seed(0)).shape == non_square.shape
    plain = augment(x, crop_scale=(1.0, 1.0), brightness=0, contrast=0, noise_std=0)
    assert torch.allclose(plain.sum((1, 2, 3)), x.sum((1, 2, 3)), atol=1e-3)  # flips/turns only
    with pytest.raises(ValueError, match="float"):
        augment(torch.randn(13, 16, 16))
    with pytest.raises(ValueError, match="crop_scale"):
        augment(x, crop_scale=(0.0, 1.0))
