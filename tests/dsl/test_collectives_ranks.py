"""``dsl.collectives`` pinned down: defaults, float64 means, the device round trip, nccl's device.

Each test also calls the helpers it checks in this process, not only in the gloo ranks:
``make mutate`` (mutmut) runs against a mutant only the tests that call the mutated function in
the test process, and the ranks are other processes.

Without CUDA the nccl path is shown with the process group and the device faked: a stand-in
``dist.all_reduce`` records what it is given, and ``Tensor.to`` is observed, so the contract
(collect on the backend's device, never touch the caller's tensor, hand back on the caller's
device) is checked call by call.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dsl import collectives as C


def _on_ranks() -> dict:
    rank, world = C.world()
    t = torch.tensor([rank + 1.0, 10.0 * rank])
    return {
        "default_op": C.all_reduce(t).tolist(),  # sum
        "untouched": t.tolist() == [rank + 1.0, 10.0 * rank],
        "max": C.all_reduce(t, "max").tolist(),
        "min": C.all_reduce(t, "min").tolist(),
        # 1e8 + 0.75 is exact in float64, not in float32
        "mean": C.mean_across_ranks(1e8 + 0.25 + rank),
        "gathered": C.gather_features(torch.arange(4.0).reshape(2, 2) + 10 * rank, gather_with_grad=True).tolist(),
        "world": (rank, world),
        "device": C.backend_device(),
    }


def test_collectives_on_two_ranks(gloo_pool):
    t = torch.tensor([1.0, 2.0])  # the same calls in this process (a world of one) first
    assert C.all_reduce(t).tolist() == [1.0, 2.0] and C.all_reduce(t) is not t
    assert C.mean_across_ranks(1e8 + 0.25) == 1e8 + 0.25
    assert C.gather_features(t, True) is t and C.world() == (0, 1) and C.backend_device() is None
    r0, r1 = gloo_pool.run(_on_ranks)
    assert (r0["world"], r1["world"]) == ((0, 2), (1, 2))
    for r in (r0, r1):
        assert r["default_op"] == [3.0, 10.0] and r["untouched"]
        assert r["max"] == [2.0, 10.0] and r["min"] == [1.0, 0.0]
        assert r["mean"] == 1e8 + 0.75
        assert r["gathered"] == [[0.0, 1.0], [2.0, 3.0], [10.0, 11.0], [12.0, 13.0]]
        assert r["device"] is None


@pytest.fixture
def two_ranks(monkeypatch):
    """This process as rank 0 of 2; ``dist.all_reduce`` adds 1.5 (the other rank's share)."""
    calls = []

    def fake_all_reduce(work, op=None):
        calls.append((work, op))
        work.add_(1.5)

    monkeypatch.setattr(C, "world", lambda: (0, 2))
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    return calls


@pytest.fixture
def to_calls(monkeypatch):
    """Every ``Tensor.to`` call as (device argument, copy argument)."""
    calls, original = [], torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append((args[0] if args else kwargs.get("device", "<none>"), kwargs.get("copy", "<none>")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    return calls


def test_all_reduce_maps_ops_and_keeps_the_input(two_ranks):
    t = torch.tensor([1.0, 2.0])
    assert C.all_reduce(t).tolist() == [2.5, 3.5] and t.tolist() == [1.0, 2.0]
    assert C.all_reduce(t, "max").tolist() == [2.5, 3.5] and C.all_reduce(t, "min").tolist() == [2.5, 3.5]
    ops = [op for _, op in two_ranks]
    assert ops == [dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN]
    with pytest.raises(KeyError):
        C.all_reduce(t, "avg")


def test_mean_across_ranks_in_float64(two_ranks):
    assert C.mean_across_ranks(1e8) == 5e7 + 0.75  # (1e8 + 1.5) / 2: lost in float32
    work, _ = two_ranks[-1]
    assert work.dtype == torch.float64 and work.tolist() == [1e8 + 1.5]


def test_all_reduce_without_a_backend_device_clones_in_place(two_ranks, to_calls):
    t = torch.tensor([1.0, 2.0])
    out = C.all_reduce(t)
    assert out.tolist() == [2.5, 3.5] and t.tolist() == [1.0, 2.0]
    assert two_ranks[0][0] is not t and two_ranks[0][0].data_ptr() != t.data_ptr()
    assert to_calls == [(t.device, "<none>")]  # only the hand-back


def test_all_reduce_collects_on_the_backend_device_and_hands_back(two_ranks, to_calls, monkeypatch):
    monkeypatch.setattr(C, "backend_device", lambda: torch.device("cpu"))
    t = torch.tensor([1.0, 2.0], requires_grad=True)
    out = C.all_reduce(t)
    assert out.tolist() == [2.5, 3.5] and t.tolist() == [1.0, 2.0]  # a copy went to the backend
    assert not out.requires_grad
    assert to_calls == [(torch.device("cpu"), True), (t.device, "<none>")]


@pytest.mark.parametrize(("backend", "device"), [("nccl", torch.device("cuda", 2)), ("gloo", None),
                                                  ("cpu:gloo,cuda:nccl", None)])
def test_backend_device(monkeypatch, backend, device):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert C.backend_device() == device


def test_gather_features_needs_a_group_for_more_than_one():
    x = torch.ones(2, 3)
    assert C.gather_features(x, gather_with_grad=False) is x
