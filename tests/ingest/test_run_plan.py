"""``ingest.run``'s plan and scheduler, without Ray: the split by location, the partitions, the
plan id a resume recognises, and how partitions are handed to Ray tasks (a stand-in ``ray``
module records it), plus the command's output. ``test_ingest_commit.py`` covers the commit."""

from __future__ import annotations

import hashlib
import sys
from types import ModuleType, SimpleNamespace

import pytest

import dsl.runtime.ray_start as ray_start
import ingest.run as run
from dsl.contracts.config import Config, ConfigError, IngestConfig
from ingest.sources import PairItem


def item(key: str, location: str, split: str | None = None) -> PairItem:
    return PairItem(key=key, location=location, files=(("s1", f"/in/{key}.tif"),), split=split)


def h(location: str) -> float:
    return int(hashlib.sha1(location.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def test_split_by_location_hash():
    # h: a .527, b .913, c .518, d .235, e .347, f .289, g .332, h .156
    got = {loc: run.assign_split(item("k", loc), 0.3) for loc in "abcdefgh"}
    assert got == {"a": "train", "b": "train", "c": "train", "d": "val", "e": "train", "f": "val", "g": "train",
                   "h": "val"}
    assert run.assign_split(item("k", "e"), h("e")) == "train"  # exactly the fraction: not below it
    assert run.assign_split(item("k", "e"), h("e") + 1e-9) == "val"
    for fraction in (0.0, -1.0):  # no split of our own: the source's (or none)
        assert run.assign_split(item("k", "d", split="validation"), fraction) == "validation"
        assert run.assign_split(item("k", "d"), fraction) is None


def test_partitions_per_split_in_key_order():
    items = [item(f"k{i}", loc) for i, loc in enumerate("dabhfceg")]
    parts = run.plan_partitions(items, 2, 0.3, "px")
    assert [(p.split, p.index, [i.key for i in p.items], p.shard) for p in parts] == [
        ("train", 0, ["k1", "k2"], "px-train-000000.tar"),
        ("train", 1, ["k5", "k6"], "px-train-000001.tar"),
        ("train", 2, ["k7"], "px-train-000002.tar"),
        ("val", 0, ["k0", "k3"], "px-val-000000.tar"),
        ("val", 1, ["k4"], "px-val-000001.tar"),
    ]
    # without a split: one series, the source's own splits sorted with None first
    items = [item("b", "x", "test"), item("a", "y"), item("c", "z", "test"), item("d", "w")]
    parts = run.plan_partitions(items, 5, 0.0, "pairs")
    assert [(p.split, p.index, [i.key for i in p.items], p.shard) for p in parts] == [
        (None, 0, ["a", "d"], "pairs-000000.tar"), ("test", 0, ["b", "c"], "pairs-test-000000.tar")]
    assert run.Partition(None, 3, ()).shard == "pairs-000003.tar"


def test_plan_id_is_stable_and_covers_what_shapes_the_output():
    items = [PairItem(key=f"k{i}", location=f"l{i % 3}", files=(("s1", f"/x/{i}.tif"),)) for i in range(4)]
    cfg = IngestConfig(input="/in")
    pid = run._plan_id(cfg, items, 3)
    # a plan written by an earlier run of this version must be recognised by the next
    assert pid == "d32155a9731b933e1156b62adfe4ee36a2556cdb5997bf44548be8e605378d32"
    changed = [cfg.model_copy(update={k: v}) for k, v in
               {"source": "zarr", "input": "/other", "prefix": "p2", "val_fraction": 0.1, "tile_size": 128}.items()]
    assert len({pid, *(run._plan_id(c, items, 3) for c in changed), run._plan_id(cfg, items, 4),
                run._plan_id(cfg, items[:3], 3)}) == 8
    same = cfg.model_copy(update={"workers": 7, "output": "/else", "progress": False, "max_bad_fraction": 0.5})
    assert run._plan_id(same, items, 3) == pid


def test_read_json(tmp_path):
    assert run._read_json(str(tmp_path / "missing.json")) is None
    (tmp_path / "p.json").write_text('{"plan_id": "x"}')
    assert run._read_json(str(tmp_path / "p.json")) == {"plan_id": "x"}


class FakeRay(ModuleType):
    """``ray`` as ``_run_tasks`` uses it; a task runs when it is waited for."""

    def __init__(self):
        super().__init__("ray")
        self.options, self.puts, self.in_flight, self.submitted, self.finished = None, [], [], 0, 0

    def remote(self, **options):
        self.options = options

        def wrap(fn):
            def submit(*args):
                self.submitted += 1
                self.in_flight.append(self.submitted - self.finished)
                return SimpleNamespace(fn=fn, args=args)
            return SimpleNamespace(remote=submit)
        return wrap

    def put(self, obj):
        self.puts.append(obj)
        return SimpleNamespace(value=obj)

    def wait(self, pending, num_returns):
        assert num_returns == 1
        self.finished += 1
        return pending[:1], pending[1:]

    def get(self, refs):
        return [r.fn(*[a.value if isinstance(a, SimpleNamespace) else a for a in r.args]) for r in refs]


class Bar:
    made: list[Bar] = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.postfix, self.closed = kwargs, [], [], False
        Bar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def set_postfix(self, **kw):
        self.postfix.append(kw)

    def close(self):
        self.closed = True


@pytest.fixture
def fake_ray(monkeypatch):
    ray = FakeRay()
    started = []
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(ray_start, "init_ray", lambda address, num_cpus: started.append((address, num_cpus)))
    monkeypatch.setattr("tqdm.tqdm", Bar)
    Bar.made.clear()
    return ray, started


@pytest.mark.parametrize(("address", "progress", "cpus"), [(None, True, 3), ("ray://head:10001", False, None)])
def test_partitions_run_as_bounded_ray_tasks(fake_ray, monkeypatch, address, progress, cpus):
    ray, started = fake_ray
    done = []

    def write_partition(cfg, part):
        done.append(part.index)
        return {"bad": part.index % 2, "seconds": 0.5 * part.index, "items": len(part.items)}

    monkeypatch.setattr(run, "write_partition", write_partition)
    cfg = IngestConfig(input="/in", workers=3, address=address, progress=progress)
    todo = [run.Partition(None, i, tuple(item(f"k{i}{j}", "l") for j in range(i + 1))) for i in range(5)]
    busy = run._run_tasks(cfg, todo, 40, 7, 2)
    assert started == [(address, cpus)]
    assert ray.options == {"num_cpus": 1, "max_retries": 2} and ray.puts == [cfg]
    assert done == [0, 1, 2, 3, 4] and busy == 0.5 * (0 + 1 + 2 + 3 + 4)
    assert max(ray.in_flight) == 3  # never more than cfg.workers tasks at once
    (bar,) = Bar.made
    assert bar.kwargs == {"total": 40, "initial": 7, "unit": "pair", "disable": not progress, "desc": "ingest"}
    assert bar.updates == [1, 2, 3, 4, 5] and bar.closed
    assert bar.postfix == [{"bad": 2}, {"bad": 2}, {"bad": 3}, {"bad": 3}, {"bad": 4}, {"bad": 4}]


def test_command_needs_an_input_and_prints_what_it_wrote(monkeypatch, capsys):
    with pytest.raises(ConfigError) as e:
        run.command(Config(), None)
    assert str(e.value) == "ingest.input is required (--input PATH_OR_URL)"
    manifest = SimpleNamespace(samples=12, shards=[1, 2, 3], samples_by_split={"train": 12}, bad=2)
    monkeypatch.setattr(run, "ingest", lambda cfg: manifest)
    cfg = Config.model_validate({"ingest": {"input": "/raw", "output": "/out"}})
    assert run.command(cfg, None) == 0
    assert capsys.readouterr().out == "wrote 12 pairs in 3 shards ({'train': 12}), 2 quarantined, to /out\n"
