"""Hypothesis fuzzing of the code that parses untrusted shard bytes (issue 10).

The loader's path for one sample is :func:`dsl.data.pairs.split_sample` (its hand-written
ustar parser :func:`~dsl.data.pairs._ustar_member`) and then :meth:`Batcher.prepare`, which
decodes the members with :func:`dsl.contracts.shard_format.decode_array` and checks them. The
samples fuzzed here are real ones: written by the ingest's writer (``sample_members`` into a
``ShardWriter``), then mutated: bytes flipped, cut, spliced with another sample, header fields
rewritten (sizes up to 8 GB, signs, types, names, magic), pax ``x``/``g``, GNU long-name, link
and directory members inserted. Every outcome must be either

- exactly the original arrays (mutations that leave the members' bytes whole), or arrays equal
  to what an independent reader makes of the same bytes (stdlib ``tarfile`` for the members,
  ``np.load`` for .npy), or
- a one-line ``ValueError`` naming the shard (the loader counts and skips those, any other
  exception kills the job),

within the deadline (no hangs) and without allocating more than the format's bound
(:data:`MAX_ARRAY_BYTES` for one decoded member; nothing for a member's claimed size).
The member decoders (.npy, .blosc) and the byte-offset index are fuzzed on their own too.

Reproducible for CI: ``derandomize=True`` (a fixed sequence of examples per test), no example
database, ~200 examples per test.
"""

from __future__ import annotations

import io
import tarfile
import time
import tracemalloc

import numpy as np
import pytest
from fixtures.hang import time_limit
from fixtures.shards import cfg_for, write_dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dsl.contracts.manifest import read_manifest
from dsl.contracts.shard_format import MAX_ARRAY_BYTES, decode_array, encode_blosc, encode_npy
from dsl.contracts.shard_index import MAX_SAMPLE_BYTES, ShardIndex, encode_index, parse_index
from dsl.data.pairs import Batcher, _ustar_member, split_sample
from ingest.sources.base import Pair
from ingest.writer import ShardWriter, sample_members

BLOCK = tarfile.BLOCKSIZE
URL = "fuzz://pairs-000007.tar"
START = 3 * BLOCK  # where the sample's range starts in its shard: errors name absolute bytes
SIZE = 16
FUZZ = settings(max_examples=200, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Python objects a parse may allocate besides its decoded arrays (headers, dicts, messages)
SLACK = 1 << 20


def _pair(idx: int, labels: bool, fallback: bool = False) -> Pair:
    rng = np.random.default_rng(idx)
    s1 = rng.uniform(-30, 5, (2, SIZE, SIZE)).astype(np.float32)
    if fallback:  # a value the fixed point cannot hold within its bound: stored as float32 s1.npy
        s1[0, 0, 0] = 50.123456
    s2 = rng.integers(0, 10_000, (13, SIZE, SIZE), dtype=np.uint16)
    dfc = rng.integers(0, 8, (SIZE, SIZE), dtype=np.uint8) if labels else None
    extra = {"cls": idx % 8, "multi": (np.arange(8) % 2).astype(np.uint8)} if labels else {}
    return Pair(key=f"loc{idx:04d}", location=f"l{idx}", s1=s1, s2=s2, meta={"id": idx}, dfc=dfc, extra=extra)


class Case:
    """One real sample: its bytes as the writer wrote them and what the loader makes of them."""

    def __init__(self, data: bytes, batcher: Batcher, arrays: dict):
        self.data, self.batcher, self.arrays = data, batcher, arrays
        self.key = split_sample(data, URL, START)["__key__"].encode()  # NAMES' loc0000 becomes this
        self.headers = []  # offsets of the member headers within data
        pos = 0
        while pos < len(data):
            info = tarfile.TarInfo.frombuf(data[pos : pos + BLOCK], "utf-8", "surrogateescape")
            self.headers.append(pos)
            pos += BLOCK + info.size + (-info.size % BLOCK)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    """Samples of each encoding, read back from a shard the writer committed."""
    root = tmp_path_factory.mktemp("fuzz-shards")
    manifest = read_manifest(write_dataset(root / "ds", [1]))  # 2 S1 / 13 S2 bands, identity stats
    cfg = cfg_for(str(root / "ds"), crop_size=8)
    kinds = {"compact": ("compact", False, False), "plain": ("plain", False, False),
             "labels": ("compact", True, False), "s1-fallback": ("compact", False, True),
             "other": ("compact", False, False)}
    writer = ShardWriter(str(root / "pairs-000000.tar"))
    for idx, (encoding, labels, fallback) in enumerate(kinds.values()):
        writer.add(sample_members(_pair(idx, labels, fallback), "train", encoding))
    info = writer.commit()
    shard = (root / "pairs-000000.tar").read_bytes()
    out = {}
    for idx, (kind, (_, labels, _)) in enumerate(kinds.items()):
        data = shard[info["offsets"][idx] : info["offsets"][idx + 1]]
        batcher = Batcher(cfg, manifest, labels=labels, raw=False)
        arrays = _parse(data, batcher)
        pair = _pair(idx, labels, kind == "s1-fallback")
        np.testing.assert_allclose(arrays["s1"], pair.s1, atol=0.01)  # the fixed point's bound
        assert np.array_equal(arrays["s2"], pair.s2)
        out[kind] = Case(data, batcher, arrays)
    return out


def _parse(data: bytes, batcher: Batcher) -> dict:
    """The loader's path for one sample's byte range: split it, decode and check its members."""
    sample = batcher.prepare(split_sample(data, URL, START))
    return {"s1": sample["__s1__"], "s2": sample["__s2__"], "labels": sample.get("__labels__")}


def _outcome(data: bytes, batcher: Batcher) -> dict | None:
    """The parse's arrays, or None for a clear ValueError; asserts time, memory and message."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with time_limit(1.5, "parsing"):
            got = _parse(data, batcher)
        event("arrays")
        return got
    except ValueError as e:  # any other type escapes and fails the test
        event("ValueError")
        message = str(e)
        assert message.startswith(URL + ":"), message
        assert "\n" not in message and len(message) < 2000, message
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert time.perf_counter() - t0 < 1.0
        # decoded members: at most MAX_ARRAY_BYTES each, whatever a header claims
        assert peak < 2 * MAX_ARRAY_BYTES + SLACK, peak


def _same(got: dict, want: dict) -> bool:
    def eq(a, b) -> bool:
        if isinstance(a, tuple):
            return len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, np.ndarray):
            return a.dtype == b.dtype and np.array_equal(a, b)
        return a == b
    return all(eq(got[k], want[k]) for k in want)


def _tar_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """Regular members of ``data`` as stdlib tarfile reads them (None: tarfile refuses)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data + b"\0" * 2 * BLOCK), mode="r:") as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return None


def _check_against_tarfile(data: bytes) -> None:
    """If split_sample takes ``data``, tarfile finds the very same members (names and bytes).

    Header fields the loader has no use for (mode, ids, mtime, device numbers) are set to
    valid values first: tarfile refuses a garbled mtime, which the loader rightly ignores.
    """
    try:
        with time_limit(1.5, "parsing"):
            sample = split_sample(data, URL, START)
    except ValueError:
        return
    ours = {f"{sample['__key__']}.{ext}": bytes(v) for ext, v in sample.items() if not ext.startswith("__")}
    clean, pos = bytearray(data), 0
    while pos + BLOCK <= len(clean) and any(clean[pos : pos + BLOCK]):
        size = _ustar_member(bytes(clean[pos : pos + BLOCK]), URL, pos)[1]
        header = bytearray(clean[pos : pos + BLOCK])
        for a, b in ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345)):
            header[a:b] = b"0" * (b - a - 1) + b"\0"
        clean[pos : pos + BLOCK] = _checksum(header)
        pos += BLOCK + size + (-size % BLOCK)
    theirs = _tar_members(bytes(clean))
    assert theirs is not None and len(theirs) == len(ours) and dict(theirs) == ours, (theirs, ours)


def _checksum(header: bytearray) -> bytearray:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return header


def _member(name: bytes, body: bytes, kind: bytes = b"0", linkname: bytes = b"") -> bytes:
    header = bytearray(BLOCK)
    header[0:100] = name[:100].ljust(100, b"\0")
    header[100:108] = b"0000444\0"
    header[108:124] = b"0000000\0" * 2
    header[124:136] = b"%011o\0" % len(body)
    header[136:148] = b"00000000000\0"
    header[156:157] = kind
    header[157:257] = linkname[:100].ljust(100, b"\0")
    header[257:265] = b"ustar\x0000"
    return bytes(_checksum(header)) + body + b"\0" * (-len(body) % BLOCK)


# ----------------------------------------------------------------------------- mutations

KINDS = ["compact", "plain", "labels", "s1-fallback"]
NAMES = [b"loc0000.s1.npy", b"loc0000.s2.blosc", b"loc0000.s1.blosc", b"loc0000.json", b"loc0000",
         b"other.s1.npy", b"/abs/loc0000.s1.npy", b"../loc0000.s2.npy", b"loc0000.__key__", b"loc0000.__url__",
         b"loc0000.s1.npy/", b".s1.npy", b"a/b/loc0000.s2.blosc", b"\xff\xfe.s1.npy", b"", b"loc0000..npy"]
# size fields: octal as writers write them, then what int() would take but tar does not
SIZES = [b"%011o" % n for n in (0, 1, 511, 512, 513, 4096, MAX_SAMPLE_BYTES, 8**11 - 1)] + [
    b"-1000", b"-1", b"-512", b"-0", b"+1000", b"1_000", b"0o1000", b"0x200", b" 1000 ", b"9999", b"", b"\x80" + b"\0" * 7 + b"\1",
    b"\xff" * 11]
KINDFLAGS = [b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"x", b"g", b"L", b"K", b"S", b"V", b"\xc8"]
PAX = [b"30 path=loc0000.s1.npy.fuzzed\n", b"18 size=99999999\n", b"9999999999 path=x\n",
       b" " * 300 + b"\n", b"0 =\n", b"%d linkpath=%s\n" % (1020, b"a" * 1000)]


def _mutate_structure(case: Case, other: Case, op: str, draw) -> bytes:
    data = bytearray(case.data)
    h = draw(st.sampled_from(case.headers))
    if op == "header":  # one field of one member's header, checksum fixed (or not)
        field = draw(st.sampled_from(["size", "type", "name", "prefix", "magic", "linkname", "garbage"]))
        header = bytearray(data[h : h + BLOCK])
        if field == "size":
            header[124:136] = draw(st.sampled_from(SIZES)).ljust(12, b"\0")[:12]
        elif field == "type":
            header[156:157] = draw(st.sampled_from(KINDFLAGS))
        elif field == "name":
            header[0:100] = draw(st.sampled_from(NAMES)).replace(b"loc0000", case.key).ljust(100, b"\0")
        elif field == "prefix":
            header[345:500] = draw(st.sampled_from([b"a", b"..", b"/", b"x" * 155])).ljust(155, b"\0")
        elif field == "magic":
            header[257:265] = draw(st.sampled_from([b"ustar  \0", b"\0" * 8, b"ustar\x0001", b"USTAR\x0000"]))
        elif field == "linkname":
            header[157:257] = b"loc0000.s1.npy".ljust(100, b"\0")
        else:
            at = draw(st.integers(0, BLOCK - 1))
            header[at] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            _checksum(header)
        data[h : h + BLOCK] = header
    elif op == "insert":  # a whole member the writer never writes, at a member boundary
        body = draw(st.sampled_from(PAX + [b"", b"x" * 700]))
        flag = draw(_mostly(b"0", st.sampled_from(KINDFLAGS)))
        name = draw(st.sampled_from(NAMES + [b"././@PaxHeader", b"././@LongLink"]))
        data[h:h] = _member(name.replace(b"loc0000", case.key), body, flag, linkname=b"loc0000.s1.npy")
    elif op == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif op == "splice":  # part of another sample's range, at a block or any byte
        a = draw(st.integers(0, len(other.data)))
        b = draw(st.integers(a, len(other.data)))
        at = draw(st.sampled_from([*case.headers, len(data), draw(st.integers(0, len(data)))]))
        data[at:at] = other.data[a:b]
    elif op == "drop":  # a whole member left out
        i = case.headers.index(h)
        end = case.headers[i + 1] if i + 1 < len(case.headers) else len(data)
        del data[h:end]
    else:  # two members swapped
        spans = [(s, e) for s, e in zip(case.headers, [*case.headers[1:], len(data)], strict=True)]
        i, j = sorted(draw(st.lists(st.integers(0, len(spans) - 1), min_size=2, max_size=2, unique=True)))
        parts = [bytes(data[s:e]) for s, e in spans]
        parts[i], parts[j] = parts[j], parts[i]
        data = bytearray(b"".join(parts))
    return bytes(data)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(KINDS),
       op=st.sampled_from(["header", "insert", "truncate", "splice", "drop", "reorder"]))
def test_structural_mutations_give_the_original_arrays_or_a_value_error(cases, data, kind, op):
    """Whatever is done to a sample's tar structure, what comes out is the writer's arrays
    (member order, a dropped metadata member, an end cut after the arrays do not change them)
    or a one-line ValueError: never other arrays, another exception, a hang or a big allocation."""
    case = cases[kind]
    mutated = _mutate_structure(case, cases["other"], op, data.draw)
    got = _outcome(mutated, case.batcher)
    if got is not None:
        # a renamed key is the same sample under another name; members are never mixed up
        assert _same(got, case.arrays), (kind, op)
    _check_against_tarfile(mutated)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(KINDS), field=st.sampled_from(["size", "type", "name"]))
def test_header_fields_give_the_original_arrays_or_a_value_error(cases, data, kind, field):
    """One number, type or name field of one member header rewritten, its checksum made right:
    what a crafted shard does (signs and '_' in sizes, 8 GB sizes, links, pax, odd names)."""
    case = cases[kind]
    h = data.draw(st.sampled_from(case.headers))
    header = bytearray(case.data[h : h + BLOCK])
    if field == "size":
        header[124:136] = data.draw(st.sampled_from(SIZES)).ljust(12, b"\0")[:12]
    elif field == "type":
        header[156:157] = data.draw(st.sampled_from(KINDFLAGS))
    else:
        header[0:100] = data.draw(st.sampled_from(NAMES)).replace(b"loc0000", case.key).ljust(100, b"\0")
    mutated = case.data[:h] + bytes(_checksum(header)) + case.data[h + BLOCK :]
    got = _outcome(mutated, case.batcher)
    if got is not None:
        assert _same(got, case.arrays), (kind, field)
    _check_against_tarfile(mutated)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(KINDS), flips=st.integers(1, 8))
def test_flipped_bytes_give_a_value_error_or_what_the_bytes_hold(cases, data, kind, flips):
    """Bytes flipped anywhere (headers, .npy headers, blosc headers and frames, padding): a
    ValueError, or arrays exactly as an independent reader decodes the same bytes."""
    case = cases[kind]
    mutated = bytearray(case.data)
    for _ in range(flips):
        at = data.draw(st.one_of(st.integers(0, len(mutated) - 1),  # mostly near the structure:
                                 st.sampled_from(case.headers).flatmap(lambda h: st.integers(h, h + 2 * BLOCK - 1))))
        if at < len(mutated):
            mutated[at] = data.draw(st.integers(0, 255))
    mutated = bytes(mutated)
    got = _outcome(mutated, case.batcher)
    _check_against_tarfile(mutated)
    if got is None:
        return
    members = dict(_tar_members(mutated))
    for ext, name in (("s1.npy", "s1"), ("s2.npy", "s2")):
        full = next((n for n in members if n.endswith("." + ext)), None)
        if full is not None and not any(n.endswith("." + ext.replace("npy", "blosc")) for n in members):
            ref = np.load(io.BytesIO(members[full]), allow_pickle=False)  # numpy's own reader
            assert ref.dtype == got[name].dtype and np.array_equal(ref, got[name], equal_nan=True)
    if mutated == case.data:
        assert _same(got, case.arrays)


@FUZZ
@given(blob=st.binary(max_size=4 * BLOCK), kind=st.sampled_from(KINDS))
def test_arbitrary_bytes_are_a_value_error(cases, blob, kind):
    """Bytes that are no sample at all (or a sample's first header then noise)."""
    case = cases[kind]
    for data in (blob, case.data[:BLOCK] + blob):
        assert _outcome(data, case.batcher) is None  # no S2 member at least
        _check_against_tarfile(data)


def test_claimed_sizes_are_refused_before_any_allocation(cases):
    """A member claiming 8 GB (the size field's most), 1 TB arrays in .npy and .blosc headers."""
    case = cases["plain"]
    header = bytearray(case.data[:BLOCK])
    header[124:136] = b"77777777777\0"
    huge = bytes(_checksum(header)) + case.data[BLOCK:]
    npy_1tb = b"{'descr': '<u2', 'fortran_order': False, 'shape': (13, 2**20, 2**19), }"
    npy = b"\x93NUMPY\x01\x00" + len(npy_1tb).to_bytes(2, "little") + npy_1tb
    blosc = bytearray(b"".join(bytes(c) for c in encode_blosc(np.zeros((13, 8, 8), np.uint16))))
    blosc[16:28] = np.array([65535, 65535, 65535], "<u4").tobytes()  # 2**49 bytes decoded
    # a frame that declares the 2 GiB its (uint8 65536 x 32768) shape needs: only the cap stops it
    frame = bytearray(blosc[16 + 12 :])
    frame[4:8] = (2**31).to_bytes(4, "little")
    two_gb = b"DSLB" + bytes([1, 4, 2, 0]) + bytes(8) + np.array([2**16, 2**15], "<u4").tobytes() + frame
    for data in (huge, _member(case.key + b".s1.npy", npy) + case.data[case.headers[1]:],
                 case.data[: case.headers[1]] + _member(case.key + b".s2.blosc", bytes(blosc)),
                 case.data[: case.headers[1]] + _member(case.key + b".s2.blosc", two_gb)):
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match=f"^{URL}: (?!.*index range holds)"):
                _parse(data, case.batcher)
            assert tracemalloc.get_traced_memory()[1] < SLACK + 4 * len(data)
        finally:
            tracemalloc.stop()


# ----------------------------------------------------------------------------- member decoders

def _mostly(value, other: st.SearchStrategy) -> st.SearchStrategy:
    """``value`` three times in four, else ``other``: mutants stay near valid, so both outcomes show."""
    return st.integers(0, 3).flatmap(lambda i: other if i == 0 else st.just(value))


NUMERIC = ["<u2", "<f4", "<i2", "|u1", "<f8"]
ODD_DESCRS = [">f8", "<c8", "|b1", "<U3", "|S4", "|V8", "O", "<M8[s]", "<m8", [("a", "<i4")], ("<i4", (3,)),
              ("<i4", (2**40,)), [("a", "<i4", (2**40,))], "<i0", 5, "", "<f2"]
ODD_SHAPES = st.one_of(
    st.lists(st.one_of(st.integers(-3, 4), st.sampled_from([2**31, 2**62, 2**64, 2**100])), max_size=5).map(tuple),
    st.sampled_from([None, 1.5, (1.5,), "x", ((1,),), (1,) * 40]))


@st.composite
def npy_members(draw) -> bytes:
    """.npy bytes: a header numpy's parser reads (mostly), odd values in it, a payload that
    mostly fits the shape."""
    header = {"descr": draw(st.one_of(st.sampled_from(NUMERIC), _mostly(NUMERIC[0], st.sampled_from(ODD_DESCRS)))),
              "fortran_order": draw(_mostly(False, st.sampled_from([True, 2]))),
              "shape": draw(_mostly(None, ODD_SHAPES)) or draw(st.lists(st.integers(0, 4), max_size=4).map(tuple))}
    text = repr(header).encode()
    if draw(_mostly(False, st.booleans())):
        text = text.replace(b"'shape'", draw(st.sampled_from([b"'shape2'", b"'shape': 1, 'x'"])))
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    major = draw(_mostly(1, st.sampled_from([2, 3, 0])))
    length = len(text) + draw(_mostly(0, st.sampled_from([-1, 1, 2**15])))
    prefix = b"\x93NUMPY" + bytes([major, 0]) + (length % 2**16).to_bytes(2, "little") if major != 2 else \
        b"\x93NUMPY\x02\x00" + (length % 2**32).to_bytes(4, "little")
    try:
        fits = np.dtype(header["descr"]).itemsize * int(np.prod(header["shape"]))
    except Exception:
        fits = -1
    if 0 <= fits <= 4096 and draw(_mostly(True, st.just(False))):
        payload = draw(st.binary(min_size=fits, max_size=fits))
    else:
        payload = draw(st.binary(max_size=64))
    return prefix + text + payload


def _decoded(ext: str, data: bytes) -> np.ndarray | None:
    tracemalloc.start()
    try:
        got = decode_array(ext, data, "m")
        event("array")
        return got
    except ValueError as e:
        event("ValueError")
        assert str(e).startswith("m: ") and "\n" not in str(e), str(e)
        return None
    finally:
        assert tracemalloc.get_traced_memory()[1] < MAX_ARRAY_BYTES + SLACK
        tracemalloc.stop()


@FUZZ
@given(data=npy_members())
def test_npy_decoding_agrees_with_numpy_or_is_a_value_error(data):
    got = _decoded("s1.npy", data)
    if got is not None:
        ref = np.load(io.BytesIO(data), allow_pickle=False)
        assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref, equal_nan=True)


def _blosc_good() -> bytes:
    a = (1000 + np.arange(13 * 8 * 8) % 97).astype(np.uint16).reshape(13, 8, 8)
    return b"".join(bytes(c) for c in encode_blosc(a))


@FUZZ
@given(magic=_mostly(b"DSLB", st.sampled_from([b"DSLC", b"\0" * 4])), version=_mostly(1, st.integers(0, 255)),
       code=_mostly(1, st.integers(0, 5)), dims=_mostly([13, 8, 8], st.lists(
           st.one_of(st.integers(0, 16), st.just(2**32 - 1)), max_size=5)),
       scale=_mostly(0.0, st.floats(allow_nan=True, allow_infinity=True)),
       frame_edit=_mostly([], st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=3)),
       frame_fields=_mostly((None, None), st.tuples(st.sampled_from([None, 0, 1, 2**31, 2**32 - 1]),
                                                    st.sampled_from([None, 0, 1, 2**32 - 1]))),
       cut=_mostly(0, st.integers(1, 64)))
def test_blosc_decoding_is_bounded_and_refuses_what_does_not_add_up(magic, version, code, dims, scale, frame_edit,
                                                                    frame_fields, cut):
    """Every header field of a compact member, the blosc frame's declared sizes and its bytes:
    an array of the declared shape (at most MAX_ARRAY_BYTES) or a ValueError."""
    good = _blosc_good()
    frame = bytearray(good[16 + 12 :])  # after our header and the 3 dims of the good array
    nbytes, cbytes = frame_fields
    if nbytes is not None:
        frame[4:8] = nbytes.to_bytes(4, "little")
    if cbytes is not None:
        frame[12:16] = cbytes.to_bytes(4, "little")
    for at, value in frame_edit:
        frame[at % len(frame)] = value
    header = np.array([scale], dtype=np.float64)  # as the header stores it
    member = magic + bytes([version, code, len(dims), 0]) + header.tobytes() + np.array(dims, "<u4").tobytes() + frame
    got = _decoded("s2.blosc", member[: len(member) - cut])
    if got is not None:
        assert got.shape == tuple(dims) and got.nbytes <= MAX_ARRAY_BYTES
        if not frame_edit and (magic, version, code, dims, scale, frame_fields, cut) == (
                b"DSLB", 1, 1, [13, 8, 8], 0.0, (None, None), 0):
            assert np.array_equal(got, decode_array("s2.blosc", _blosc_good(), "good"))


def test_unmutated_blosc_member_decodes():
    """The generator's starting point is a member that decodes (so its mutants test something)."""
    assert decode_array("s2.blosc", _blosc_good(), "good").shape == (13, 8, 8)


# ----------------------------------------------------------------------------- the index

@FUZZ
@given(counts=st.lists(st.integers(0, 3), min_size=1, max_size=4), data=st.data())
def test_index_tables_are_checked_before_any_offset_is_trusted(counts, data):
    """ShardIndex over mutated tables: every range it then serves lies inside its shard and is
    1..MAX_SAMPLE_BYTES long, or the table is refused with a ValueError naming the index."""
    runs, sizes = [], []
    for n in counts:
        starts = np.cumsum([0] + [data.draw(st.integers(BLOCK, 4 * BLOCK)) for _ in range(n)])
        runs.append(starts.tolist())
        sizes.append(int(starts[-1]) + 2 * BLOCK)
    table = np.concatenate([np.asarray(r, np.int64) for r in runs])
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, len(table) - 1))
        table[at] = data.draw(st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-2, 5 * BLOCK),
                                        st.sampled_from([MAX_SAMPLE_BYTES, MAX_SAMPLE_BYTES + 1, 2**62])))
    shard_bytes = [data.draw(st.sampled_from([s, s - 1, None])) for s in sizes]
    try:
        index = ShardIndex(counts, table, "idx.npy", shard_bytes)
    except ValueError as e:
        event("ValueError")
        assert str(e).startswith("idx.npy: ") and "\n" not in str(e)
        return
    event("index")
    if index.samples:
        shard, begin, end = index.locate(np.arange(index.samples))
        assert (begin >= 0).all() and (end - begin >= 1).all() and (end - begin <= MAX_SAMPLE_BYTES).all()
        for s, e in zip(shard, end, strict=True):
            assert shard_bytes[s] is None or e <= shard_bytes[s]


INDEX_BLOBS = [b"", b"PK\x03\x04" + b"\0" * 40, b"\x93NUMPY", encode_npy(np.zeros((2, 2), np.int64)),
               b"\x93NUMPY\x01\x00\x46\x00{'descr': '<i8', 'fortran_order': False, 'shape': (8589934592,), }"
               + b" " * 4 + b"\n"]


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(3, np.int64))
    return buf.getvalue()


@FUZZ
@given(blob=st.one_of(st.sampled_from([*INDEX_BLOBS, _npz()]), npy_members(), st.binary(max_size=200)))
def test_index_bytes_are_an_int64_table_or_a_value_error(blob):
    """Found by this test: np.load raised AttributeError/BadZipFile/EOFError for .npz, zip junk or
    empty input and tried to allocate a claimed 64 GiB table; parse_index now decodes by hand."""
    try:
        table = parse_index(blob, "idx.npy")
    except ValueError as e:
        assert str(e).startswith("idx.npy: ") and "\n" not in str(e), str(e)
        return
    assert table.dtype == np.int64 and table.ndim == 1
    assert np.array_equal(table, np.load(io.BytesIO(blob), allow_pickle=False))


def test_valid_index_bytes_parse():
    assert parse_index(encode_index([[0, 512, 2048], [0, 1024]]), "i").tolist() == [0, 512, 2048, 0, 1024]
