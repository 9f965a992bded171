"""``dsl.losses.mma`` edges: defaults, messages, the location draw (order, devices, generator),
and that the loss is CLIP over exactly the chosen location vectors."""

from __future__ import annotations

import pytest
import torch

from dsl.losses.clip import ClipLoss
from dsl.losses.mma import MMALoss, sample_locations


def test_defaults():
    loss = MMALoss()
    assert loss.num_locations == 16
    assert (loss.clip.temperature, loss.clip.gather_with_grad, loss.clip.local_loss) == (0.07, True, True)
    loss = MMALoss(1, 0.5, True, False)
    assert (loss.num_locations, loss.clip.temperature, loss.clip.local_loss) == (1, 0.5, False)


def test_messages():
    for bad in (0, -3):
        with pytest.raises(ValueError) as e:
            MMALoss(num_locations=bad)
        assert str(e.value) == f"num_locations must be >= 1, got {bad}"
        with pytest.raises(ValueError) as e:
            sample_locations(2, 3, 3, bad)
        assert str(e.value) == f"num_locations must be >= 1, got {bad}"
    with pytest.raises(ValueError) as e:
        MMALoss()(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 2))
    assert str(e.value) == ("MMA needs two aligned [b, D, h, w] maps of equal shape (same channels and grid), "
                            "got (2, 4, 3, 3) and (2, 4, 3, 2)")
    with pytest.raises(ValueError) as e:
        MMALoss()(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3))
    assert str(e.value).endswith("got (2, 4, 3) and (2, 4, 3)")
    f = torch.zeros(2, 4, 3, 3)
    for locations in (torch.zeros(3, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                      torch.zeros(2, 2, 1, dtype=torch.long)):
        with pytest.raises(ValueError) as e:
            MMALoss()(f, f, locations=locations)
        assert str(e.value) == f"locations must be [2, k], got {tuple(locations.shape)}"


def test_all_locations_in_order_when_there_are_not_more():
    assert sample_locations(2, 2, 3, 6).tolist() == [list(range(6))] * 2  # exactly as many
    assert sample_locations(1, 1, 1, 1).tolist() == [[0]]
    loc = sample_locations(3, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    assert loc.shape == (3, 5) and all(len(set(r)) == 5 and max(r) < 6 for r in loc.tolist())


def test_devices_of_the_draw():
    g = torch.Generator().manual_seed(2)
    assert sample_locations(2, 2, 2, 8, device="meta").device.type == "meta"
    # drawn where the generator is, handed back where asked
    assert sample_locations(2, 3, 3, 4, generator=g, device="meta").device.type == "meta"
    with torch.device("meta"):
        loc = sample_locations(2, 3, 3, 4, generator=torch.Generator().manual_seed(2), device="cpu")
        free = sample_locations(2, 3, 3, 4, device="cpu")  # no generator: drawn on the target device
    assert loc.device.type == "cpu" and free.device.type == "cpu"
    assert torch.equal(loc, sample_locations(2, 3, 3, 4, generator=torch.Generator().manual_seed(2)))


def test_the_loss_is_clip_over_the_chosen_vectors():
    g = torch.Generator().manual_seed(3)
    f1, f2 = torch.randn(2, 2, 5, 3, 4, generator=g, dtype=torch.float64)  # b=2, D=5, 3x4 grid
    locations = torch.tensor([[0, 7, 11], [5, 2, 9]])
    v1 = torch.stack([f1[i].flatten(1)[:, locations[i]].T for i in range(2)]).reshape(-1, 5)
    v2 = torch.stack([f2[i].flatten(1)[:, locations[i]].T for i in range(2)]).reshape(-1, 5)
    scale = torch.tensor([0.7], dtype=torch.float64)
    want = ClipLoss(temperature=0.3)(v1, v2, scale)
    assert torch.equal(MMALoss(3, 0.3)(f1, f2, scale, locations=locations), want)
    assert not torch.equal(MMALoss(3, 0.3)(f1, f2, locations=locations), want)  # logit_scale is used
    drawn = MMALoss(3, 0.3)(f1, f2, scale, generator=torch.Generator().manual_seed(4))
    loc = sample_locations(2, 3, 4, 3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(drawn, MMALoss(3, 0.3)(f1, f2, scale, locations=loc))


def test_the_draw_consumes_the_generator_where_it_lives():
    # a CPU generator with maps elsewhere (CUDA on a GPU job; "meta" here) draws on the CPU:
    # drawing on the target device would fail on CUDA, and on meta would not advance the generator
    g, ref = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    first = sample_locations(2, 3, 3, 4, generator=g, device="meta")
    assert first.device.type == "meta"
    sample_locations(2, 3, 3, 4, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())
    nxt = sample_locations(2, 3, 3, 4, generator=g)
    assert torch.equal(nxt, sample_locations(2, 3, 3, 4, generator=ref))


@pytest.mark.parametrize("num_locations", [3, 12])  # a draw, and every location of the 3x4 grid
def test_locations_are_made_on_the_maps_device(num_locations):
    # under torch.device("meta") (see test_dual_ntxent_edges.py) locations made without naming
    # the maps' device land on meta and the CPU loss fails
    g = torch.Generator().manual_seed(7)
    f1, f2 = torch.randn(2, 2, 5, 3, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(8)  # the draw without a generator uses the global CPU generator
    want = MMALoss(num_locations, 0.3)(f1, f2)
    torch.manual_seed(8)
    with torch.device("meta"):
        got = MMALoss(num_locations, 0.3)(f1, f2)
    assert got.device == f1.device and torch.equal(got, want)
