"""dsl.runtime.device on CPU: the prefetcher's order and read-ahead, the checkpoint position under
read-ahead, the model inputs, and the GPU-only settings staying off on CPU.

The CUDA parts (side stream, pinned copies, channels_last, cuDNN autotuning, compile) run in
``benchmarks/bench_gpu.py`` on a GPU; on CPU the same read-ahead logic runs without copies.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from fixtures.shards import cfg_for, write_dataset
from torch import nn

from dsl.contracts.config import ConfigError, ScaleConfig, load_config
from dsl.data import Normaliser, batches_per_epoch, resume_stream, with_positions
from dsl.runtime.device import (
    DevicePrefetcher,
    ModelInputs,
    configure_backends,
    memory_format,
    prepare_model,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("prefetch"), [13, 9, 5])


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_hands_out_the_same_batches_in_order_and_reads_ahead(depth):
    items = [({"s1": torch.full((2, 1), float(i)), "key": [f"k{i}"]}, i) for i in range(6)]
    pulled = []

    def source():
        for item in items:
            pulled.append(item[1])
            yield item

    out = []
    for batch, extra in DevicePrefetcher(source(), CPU, depth):
        # when batch k is handed out, the next `depth` ones have been read already
        assert len(pulled) == min(extra + 1 + depth, len(items))
        out.append((batch, extra))
    assert [e for _, e in out] == list(range(6))
    assert all(b is items[i][0] for i, (b, _) in enumerate(out))  # on CPU: passed through untouched
    assert list(DevicePrefetcher(iter(()), CPU, depth)) == []


@pytest.mark.parametrize("depth", [1, 2])
def test_a_checkpoint_under_read_ahead_resumes_at_the_next_batch(shards, depth):
    """The position a step's batch came with, not the stream's live one, resumes without a gap."""
    cfg = cfg_for(shards, batch_size=2)
    per_epoch = batches_per_epoch(cfg, 1)
    n = per_epoch + 4  # across an epoch boundary
    plain_position = {"epoch": 0, "sample": 0}
    plain = []  # (keys, position after) without prefetch: what the loop recorded before
    for batch in itertools.islice(resume_stream(cfg, 0, 1, plain_position), n):
        plain.append((batch["key"], dict(plain_position)))

    live = {"epoch": 0, "sample": 0}
    prefetched = DevicePrefetcher(with_positions(resume_stream(cfg, 0, 1, live), live), CPU, depth)
    for k, (batch, consumed) in enumerate(itertools.islice(prefetched, n)):
        assert (batch["key"], consumed) == plain[k]
        if k < n - 1:
            assert live != consumed  # the stream itself is ahead: it must not be what is saved
        for resume_at in (3, per_epoch - 1, per_epoch):
            if k == resume_at - 1:  # a checkpoint after this step, then a restart
                resumed = next(resume_stream(cfg, 0, 1, dict(consumed)))
                assert resumed["key"] == plain[k + 1][0], f"resumed after batch {resume_at}"


def test_model_inputs_on_cpu_keep_the_loaders_tensors():
    batch = {"s1": torch.randn(2, 2, 8, 8), "s2": torch.randn(2, 13, 8, 8)}
    s1, s2 = ModelInputs(None, torch.float32)(batch)
    assert s1 is batch["s1"] and s2 is batch["s2"]  # today's CPU path: no copy
    s1, s2 = ModelInputs(None, torch.bfloat16)(batch)
    assert s1.dtype == torch.bfloat16 and torch.equal(s1, batch["s1"].bfloat16())
    s1, _ = ModelInputs(None, torch.bfloat16, torch.channels_last)(batch)  # loader-normalised, on a GPU
    assert s1.is_contiguous(memory_format=torch.channels_last) and torch.equal(s1, batch["s1"].bfloat16())


def test_model_inputs_normalise_raw_batches_and_lay_them_out(shards):
    from dsl.contracts.manifest import read_manifest

    norm = Normaliser.from_manifest(read_manifest(shards), "clip", s2_bands=[2, 1])
    raw = {"s1": (torch.randn(2, 2, 8, 8) * 10 - 10).half(), "s2": torch.randint(0, 12000, (2, 2, 8, 8)).to(torch.uint16)}
    s1, s2 = ModelInputs(norm, torch.bfloat16, torch.channels_last)(raw)
    want1, want2 = norm.normalise_batch(raw["s1"], raw["s2"])
    assert s1.dtype == s2.dtype == torch.bfloat16
    assert s1.is_contiguous(memory_format=torch.channels_last) and s2.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(s1, want1.bfloat16()) and torch.equal(s2, want2.bfloat16())
    view = s2.flip(-1)  # an augmentation's output keeps no particular layout
    assert ModelInputs(norm, torch.float32, torch.channels_last).layout(view).is_contiguous(
        memory_format=torch.channels_last)


def test_gpu_settings_change_nothing_on_cpu():
    scale = ScaleConfig(channels_last=True, cudnn_benchmark=True)
    assert memory_format(scale, CPU) is torch.contiguous_format
    assert memory_format(scale, torch.device("cuda", 0)) is torch.channels_last
    assert memory_format(ScaleConfig(channels_last=False), torch.device("cuda", 0)) is torch.contiguous_format
    before = torch.backends.cudnn.benchmark
    configure_backends(scale, CPU)
    assert torch.backends.cudnn.benchmark == before
    net = nn.Conv2d(3, 4, 3)
    weight = net.weight
    assert prepare_model(net, scale, CPU) is net and net.weight is weight and net.weight.is_contiguous()


def test_compile_needs_gpus():
    with pytest.raises(ConfigError, match=r"scale.compile needs GPUs \(scale.use_gpu=true\)"):
        load_config(None, ["scale.compile=true"])
    assert load_config(None, ["scale.compile=true", "scale.use_gpu=true"]).scale.compile
    defaults = load_config(None, [])
    assert not defaults.data.normalise_on_device and defaults.data.device_prefetch == 1
