"""dsl.collectives on 2 gloo ranks: values, devices, and the world of one without a group."""

from __future__ import annotations

import torch

from dsl import collectives as C


def _on_ranks() -> dict:
    rank, world = C.world()
    t = torch.tensor([rank + 1.0, 10.0 * rank])
    return {
        "world": (rank, world),
        "sum": C.all_reduce(t).tolist(),
        "max": C.all_reduce(t, "max").tolist(),
        "min": C.all_reduce(t, "min").tolist(),
        "input_untouched": t.tolist() == [rank + 1.0, 10.0 * rank],
        "mean": C.mean_across_ranks(float(rank) * 3),
        "gathered": C.gather_features(torch.full((1, 2), float(rank)), gather_with_grad=False).tolist(),
        "device": str(C.all_reduce(t).device),
        "backend_device": C.backend_device(),  # gloo takes tensors where they are
    }


def test_collectives_on_two_gloo_ranks(gloo_pool):
    r0, r1 = gloo_pool.run(_on_ranks)
    assert (r0["world"], r1["world"]) == ((0, 2), (1, 2))
    for r in (r0, r1):
        assert r["sum"] == [3.0, 10.0] and r["max"] == [2.0, 10.0] and r["min"] == [1.0, 0.0]
        assert r["input_untouched"] and r["mean"] == 1.5 and r["gathered"] == [[0.0, 0.0], [1.0, 1.0]]
        assert r["device"] == "cpu" and r["backend_device"] is None


def test_without_a_process_group_every_helper_is_a_world_of_one():
    t = torch.tensor([2.0])
    assert C.world() == (0, 1) and C.backend_device() is None
    assert C.all_reduce(t, "max").item() == 2.0 and C.mean_across_ranks(4.0) == 4.0
    assert C.gather_features(t, gather_with_grad=True) is t
