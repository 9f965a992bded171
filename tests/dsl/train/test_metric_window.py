"""The loop's metric window: device sums, the same logged values as the host sums it replaced.

Before, every step called ``.item()`` on its loss and retrieval accuracies and summed Python
floats; the window keeps the sums on the device and syncs once per log step. The logged
numbers must not move: :func:`_host_means` is the old code, and the comparison is exact.
"""

from __future__ import annotations

import pytest
import torch

from dsl.train.loop import MetricWindow, retrieval_top1


def _micro_batches(n: int, dense: bool = False):
    g = torch.Generator().manual_seed(7)
    for _ in range(n):
        shape = (16, 8, 3, 3) if dense else (16, 8)
        out1 = torch.randn(shape, generator=g)
        out2 = out1 + torch.randn(shape, generator=g) * 1.5  # partly retrievable
        yield torch.rand((), generator=g) * 5, out1, out2


def _host_means(steps) -> dict[str, float]:
    """What the loop logged before: per micro-batch means of ``.item()`` values summed on the host."""
    window: dict[str, float] = {}
    for (data_wait, step_time), (loss, out1, out2) in steps:
        for k, v in (("data_wait_s", data_wait), ("step_time_s", step_time)):
            window[k] = window.get(k, 0.0) + v
        acc12, acc21 = (x.item() for x in retrieval_top1(out1, out2))
        for k, v in (("loss", loss.item()), ("retrieval_s1_to_s2", acc12), ("retrieval_s2_to_s1", acc21)):
            window[k] = window.get(k, 0.0) + v
        window["n"] = window.get("n", 0) + 1
    n = window.pop("n")
    return {k: v / n for k, v in window.items()}


@pytest.mark.parametrize("dense", [False, True])
def test_window_logs_what_the_host_sums_logged(dense):
    steps = [((0.01 * i + 1e-3 / 3, 0.2 + i / 7), mb) for i, mb in enumerate(_micro_batches(13, dense))]
    window = MetricWindow()
    for (data_wait, step_time), (loss, out1, out2) in steps:
        window.add_times(data_wait_s=data_wait, step_time_s=step_time)
        window.add(loss, out1, out2)
    got = window.means()
    assert got == _host_means(steps)  # exactly: same float64 sums in the same order
    assert 0 < got["retrieval_s1_to_s2"] < 1
    window.reset()
    assert window.n == 0
    with pytest.raises(ValueError, match="no micro-batch in the window"):
        window.means()


def test_adding_a_micro_batch_never_syncs_with_the_host(monkeypatch):
    """No ``.item()``, ``float()``, ``bool()`` or ``.tolist()`` on a tensor per step: only at log steps."""
    window = MetricWindow()

    def sync(*args, **kwargs):
        raise AssertionError("a host sync in MetricWindow.add")

    batches = list(_micro_batches(3))
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__float__", "__bool__", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, sync)
        for loss, out1, out2 in batches:
            window.add(loss, out1, out2)
    assert window.n == 3 and set(window.means()) == {"loss", "retrieval_s1_to_s2", "retrieval_s2_to_s1"}
