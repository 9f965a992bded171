"""``dsl.losses.gather`` step by step in one process: the gradient scaling, the refused mode, and
what a pair loss's core receives in each mode.

The two-rank parity tests (``test_losses.py``) prove the modes exact; here the world is faked
(rank 1 of 3, a stand-in gather) so each rule is seen directly and in milliseconds, and so
``make mutate`` (which maps tests to the functions they call in the test process) finds them.
"""

from __future__ import annotations

import pytest
import torch

import dsl.losses.gather as G


def test_scale_grad_is_the_identity_forward_and_scales_backward():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    assert G.scale_grad(x, 1) is x and G.scale_grad(x, 1.0) is x
    for factor in (2.0, 3.0):
        y = G.scale_grad(x, factor)
        assert y is not x and torch.equal(y, x)
        (y * torch.tensor([1.0, 10.0])).sum().backward()
        assert x.grad.tolist() == [factor, 10 * factor]
        x.grad = None


def test_only_local_loss_without_gather_grad_is_refused():
    for gather_with_grad, local_loss in [(True, True), (True, False), (False, False)]:
        G.check_mode(gather_with_grad, local_loss)
    with pytest.raises(ValueError) as e:
        G.check_mode(False, True)
    assert str(e.value) == (
        "local_loss=True needs gather_with_grad=True: without gradient through the gather, "
        "the terms where this rank's embeddings are positives/negatives in other ranks' rows "
        "never reach it, so the averaged gradient is not the global-batch gradient. Use "
        "gather_with_grad=True, or local_loss=False (full matrix on every rank, exact)."
    )


@pytest.fixture
def rank1_of_3(monkeypatch):
    """This process as rank 1 of 3; the gather puts two other ranks' rows (+100, +200) around ours."""
    calls = []

    def gather(x, gather_with_grad):
        calls.append((x, gather_with_grad))
        return torch.cat([x.detach() + 100, x, x.detach() + 200])

    monkeypatch.setattr(G, "world", lambda: (1, 3))
    monkeypatch.setattr(G, "gather_features", gather)
    return calls


@pytest.mark.parametrize(("gather_with_grad", "factor"), [(True, 1.0), (False, 3.0)])
def test_gather_for_loss_scales_only_without_gather_grad(rank1_of_3, gather_with_grad, factor):
    x = torch.ones(2, 3, requires_grad=True)
    k = G.gather_for_loss(x, gather_with_grad)
    assert k.shape == (6, 3) and rank1_of_3[0][1] is gather_with_grad
    k.sum().backward()
    assert (x.grad == factor).all()  # the engine's mean over 3 ranks then divides by 3


@pytest.mark.parametrize("local_loss", [True, False])
def test_the_core_gets_this_ranks_rows_or_the_global_batch(rank1_of_3, local_loss):
    q1, q2 = torch.zeros(2, 3), torch.ones(2, 3)
    seen = []

    def core(a1, a2, k1, k2, first, scale):
        seen.append((a1, a2, k1, k2, first, scale))
        return torch.tensor(7.0)

    assert G.against_global_batch(core, q1, q2, True, local_loss, 0.5).item() == 7.0
    ((a1, a2, k1, k2, first, scale),) = seen
    assert [(x is q, flag) for (x, flag), q in zip(rank1_of_3, (q1, q2), strict=True)] == [(True, True)] * 2
    assert torch.equal(k1, torch.cat([q1 + 100, q1, q1 + 200])) and torch.equal(k2, torch.cat([q2 + 100, q2, q2 + 200]))
    assert scale == 0.5
    if local_loss:  # this rank's rows, which start at global row 1 * b
        assert a1 is q1 and a2 is q2 and first == 2
    else:  # the full matrix on every rank
        assert a1 is k1 and a2 is k2 and first == 0
