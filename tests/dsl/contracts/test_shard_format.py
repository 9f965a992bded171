"""The shard format's array members: .npy zero-copy, the compact .blosc container, hostile bytes,
and stock webdataset reading format-1 and format-2 shards."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import webdataset as wds

from dsl.contracts.shard_format import (
    MAX_ARRAY_BYTES,
    S1_MEMBERS,
    S1_STEP_DB,
    S2_MEMBERS,
    decode_array,
    decode_npy,
    encode_blosc,
    encode_npy,
    register_webdataset_decoders,
    webdataset_decoder,
)

RNG = np.random.default_rng(7)


def blosc_bytes(array: np.ndarray, scale: float = 0.0) -> bytes:
    return b"".join(bytes(c) for c in encode_blosc(array, scale))


def s2_patch(size: int = 32) -> np.ndarray:
    """Smooth reflectance-like uint16 (compressible, like real S2), plus noise in the low bits."""
    y, x = np.mgrid[:size, :size]
    base = (1000 + 400 * np.sin(x / 5.0) + 300 * np.cos(y / 7.0)).astype(np.int64)
    return np.stack([base + 50 * b + RNG.integers(0, 16, base.shape) for b in range(13)]).astype(np.uint16)


def test_members_name_every_encoding():
    assert set(S1_MEMBERS) == {"s1.npy", "s1.blosc"} and set(S2_MEMBERS) == {"s2.npy", "s2.blosc"}


@pytest.mark.parametrize("array", [
    RNG.normal(size=(2, 8, 8)).astype(np.float32),
    np.arange(13 * 16, dtype=np.uint16).reshape(13, 4, 4),
    np.zeros((0, 3), np.uint8),
    np.arange(6, dtype=">i4").reshape(2, 3),  # another byte order: read as written
])
def test_npy_decodes_as_np_load(array):
    got = decode_npy(encode_npy(array), "m")
    want = np.load(io.BytesIO(encode_npy(array)), allow_pickle=False)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert decode_array("s1.npy", memoryview(encode_npy(array)), "m").tobytes() == want.tobytes()


def test_npy_is_zero_copy_and_read_only():
    buf = bytearray(encode_npy(np.zeros((2, 4), np.float32)))
    got = decode_npy(buf)
    buf[-4:] = np.float32(5).tobytes()  # the array is a view of the member's bytes
    assert got[1, 3] == 5 and not got.flags.owndata
    assert not decode_npy(bytes(buf)).flags.writeable  # over immutable bytes: read-only


def test_npy_version_2_header():
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.arange(4, dtype=np.uint16), version=(2, 0))
    assert decode_npy(buf.getvalue()).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("array", [
    s2_patch(),
    s2_patch(17)[:, :, ::2],  # odd sizes, not contiguous
    np.arange(-300, 300, dtype=np.int16).reshape(2, 300),
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.full((4, 5), 9, np.uint8),
    np.zeros((2, 0, 3), np.uint16),
])
def test_blosc_round_trip_is_bit_exact(array):
    got = decode_array("s2.blosc", blosc_bytes(array), "m")
    assert got.dtype == array.dtype and got.shape == array.shape and got.tobytes() == array.tobytes()


def test_blosc_fixed_point_decodes_to_float32():
    k = np.array([[-32768, -3200, -1, 0, 1, 1920, 32767]], np.int16)
    got = decode_array("s1.blosc", blosc_bytes(k, S1_STEP_DB), "m")
    assert got.dtype == np.float32 and got.tolist() == (k.astype(np.float64) / 64).tolist()  # exact


def test_blosc_shuffles_by_element():
    """Compressing the array (itemsize 2), not its bytes: shuffle groups high and low bytes."""
    s2 = s2_patch(64)
    plain = np.frombuffer(blosc_bytes(s2.view(np.uint8).reshape(-1)), np.uint8)  # itemsize 1
    assert len(blosc_bytes(s2)) < 0.9 * len(plain)


def test_encode_refuses_what_no_reader_takes():
    for array, scale, msg in [
        (np.zeros(3, np.float64), 0.0, "no compact encoding"),
        (np.zeros((1,) * 5, np.uint16), 0.0, "no compact encoding"),
        (np.zeros(3, np.int16), float("nan"), "scale"),
        (np.zeros(3, np.int16), -1.0, "scale"),
        (np.zeros(3, np.int16), 1e39, "scale"),
    ]:
        with pytest.raises(ValueError, match=msg):
            encode_blosc(array, scale)


def test_blosc_decode_checks_the_limit_before_allocating(monkeypatch):
    header = struct.pack("<4sBBBBd", b"DSLB", 1, 1, 3, 0, 0.0) + struct.pack("<3I", 13, 65536, 65536)
    frame = blosc_bytes(np.zeros(4, np.uint16))[struct.calcsize("<4sBBBBd") + 4:]
    allocated = []
    monkeypatch.setattr(np, "empty", lambda *a, **k: allocated.append(a))
    with pytest.raises(ValueError, match=r"^s2\.blosc: declares shape \(13, 65536, 65536\) \(111669149696 bytes decoded\), "
                       rf"over the limit {MAX_ARRAY_BYTES}$"):
        decode_array("s2.blosc", header + frame, "s2.blosc")
    assert allocated == []


def _frame_at(member: bytes) -> int:
    ndim = member[6]
    return struct.calcsize("<4sBBBBd") + 4 * ndim


def hostile_blosc() -> list[tuple[str, bytes, str]]:
    good = blosc_bytes(s2_patch())
    at = _frame_at(good)
    body = bytearray(good)
    body[at + 16 : at + 80] = bytes(64)  # the compressed stream zeroed, sizes intact
    other_shape = bytearray(good)
    other_shape[at - 4 : at] = struct.pack("<I", 33)
    return [
        ("empty", b"", "shorter than its header"),
        ("header only", good[:at], "cut before its blosc frame"),
        ("truncated", good[:-7], r"declares \d+ bytes in \d+, the member holds \d+"),
        ("padded", good + b"\0", "the member holds"),
        ("wrong magic", b"NPYB" + good[4:], "not a compact member"),
        ("raw blosc frame", good[at:], "not a compact member"),
        ("unknown dtype", good[:5] + b"\x09" + good[6:], "dtype code 9"),
        ("rank 0", good[:6] + b"\x00" + good[7:], "0 dims"),
        ("nan scale", good[:8] + struct.pack("<d", float("nan")) + good[16:], "scale nan"),
        ("huge scale", good[:8] + struct.pack("<d", 1e300) + good[16:], "scale 1e\\+300"),
        ("shape vs frame", bytes(other_shape), r"\(13, 32, 33\) of uint16 needs 27456 bytes; its blosc frame declares 26624"),
        ("wrong codec bytes", bytes(body), "corrupt blosc frame"),
    ]


@pytest.mark.parametrize("case,data,msg", hostile_blosc(), ids=[c[0] for c in hostile_blosc()])
def test_hostile_blosc_member_is_a_value_error_naming_it(case, data, msg):
    where = "shard.tar: sample 'k': s2.blosc"
    with pytest.raises(ValueError, match=msg) as e:
        decode_array("s2.blosc", data, where)
    assert str(e.value).startswith(where + ": ")


def _npy_with_header(header: dict, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def hostile_npy() -> list[tuple[str, bytes, str]]:
    good = encode_npy(np.zeros((2, 4, 4), np.float32))
    obj = io.BytesIO()
    np.save(obj, np.array([1, "x"], dtype=object), allow_pickle=True)
    return [
        ("empty", b"", "corrupt .npy"),
        ("no magic", b"x" * 200, "corrupt .npy"),
        ("version 9", good[:6] + b"\x09\x00" + good[8:], "unsupported .npy version 9.0"),
        ("cut in the header", good[:40], "corrupt .npy"),
        ("truncated payload", good[:-5], r"needs 128 bytes, the payload has 123"),
        ("padded payload", good + b"\0" * 4, r"needs 128 bytes, the payload has 132"),
        ("huge declared shape", _npy_with_header({"descr": "<f4", "fortran_order": False, "shape": (10**12,)}, b"\0" * 64),
         r"needs 4000000000000 bytes, the payload has 64"),
        ("object dtype", obj.getvalue(), r"dtype object"),
        ("structured dtype", encode_npy(np.zeros(2, dtype=[("a", "<f4")])), "dtype"),
        ("fortran order", _npy_with_header({"descr": "<f4", "fortran_order": True, "shape": (2, 2)}, b"\0" * 16),
         "Fortran order"),
        ("garbled header", good[:10] + b"{'descr': <f4, 'fortran_" + good[34:], "not a plain numeric .npy"),
    ]


@pytest.mark.parametrize("case,data,msg", hostile_npy(), ids=[c[0] for c in hostile_npy()])
def test_hostile_npy_member_is_a_value_error_naming_it(case, data, msg):
    where = "shard.tar: sample 'k': s1.npy"
    with pytest.raises(ValueError, match=msg) as e:
        decode_array("s1.npy", data, where)
    assert str(e.value).startswith(where + ": ")


def test_unknown_extension_is_a_value_error():
    with pytest.raises(ValueError, match=r"^w: no array decoder for member extension 's1.tif'$"):
        decode_array("s1.tif", b"", "w")


def test_fuzzed_frames_never_crash_the_process():
    """Byte flips anywhere in a member end in a ValueError or an array, never in a crash (the
    C decompressor runs in a child process: a segfault fails this test, not the session)."""
    code = textwrap.dedent("""
        import numpy as np
        from dsl.contracts.shard_format import decode_array, encode_blosc
        rng = np.random.default_rng(0)
        a = (1000 + rng.integers(0, 64, (13, 24, 24))).astype(np.uint16)
        good = b"".join(bytes(c) for c in encode_blosc(a))
        outcomes = {"error": 0, "array": 0}
        for i in range(3000):
            m = bytearray(good)
            for _ in range(1 + i % 4):
                m[rng.integers(0, len(m))] = rng.integers(0, 256)
            try:
                got = decode_array("s2.blosc", bytes(m), "m")
                assert got.shape == a.shape
                outcomes["array"] += 1
            except ValueError:
                outcomes["error"] += 1
        print(outcomes)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'error'" in r.stdout


def write_tar(path, samples: dict[str, dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_stock_webdataset_reads_both_formats(tmp_path):
    s1 = RNG.uniform(-50, 30, (2, 16, 16)).astype(np.float32)
    fixed = np.rint(s1 * 64).astype(np.int16)
    s2 = s2_patch(16)
    old = write_tar(tmp_path / "v1.tar", {"a": {"s1.npy": encode_npy(s1), "s2.npy": encode_npy(s2), "json": b"{}"}})
    new = write_tar(tmp_path / "v2.tar", {"b": {"s1.blosc": blosc_bytes(fixed, S1_STEP_DB), "s2.blosc": blosc_bytes(s2),
                                                 "json": b"{}"}})
    want_s1_v2 = fixed.astype(np.float32) / 64

    def read(url, *handlers):
        (sample,) = wds.WebDataset(url, shardshuffle=False, empty_check=False).decode(*handlers)
        return sample

    for handlers in [(webdataset_decoder,), ()]:
        if not handlers:
            register_webdataset_decoders()  # the stock default decoders, taught .blosc
        a, b = read(old, *handlers), read(new, *handlers)
        assert a["s1.npy"].dtype == np.float32 and a["s1.npy"].tobytes() == s1.tobytes()
        assert a["s2.npy"].dtype == np.uint16 and a["s2.npy"].tobytes() == s2.tobytes()
        assert b["s1.blosc"].dtype == np.float32 and np.array_equal(b["s1.blosc"], want_s1_v2)
        assert np.abs(b["s1.blosc"] - s1).max() <= 0.01
        assert b["s2.blosc"].dtype == np.uint16 and b["s2.blosc"].tobytes() == s2.tobytes()
        assert b["json"] == {} and a["json"] == {}
