"""URLs without a bucket or host are refused with one line naming the key, never written to.

``s3://`` joined with a file name became the local path ``s3:/file``: an ingest to
``--output s3://`` wrote into a folder named ``s3:`` and reported success.
"""

from __future__ import annotations

import pytest

from dsl.cli import main
from dsl.contracts.storage import check_url, filesystem, join

BAD = {
    "s3://": "names no bucket",
    "s3:///x": "names no bucket",
    "gs://": "names no bucket",
    "http://": "names no host",
    "simplecache::s3://": "names no bucket",
    "s3:/bucket/x": "is not a URL",
    "s3:bucket": "is not a URL",
    " s3://bucket": "starts or ends with spaces",
    "": "is empty",
}
GOOD = ["s3://bucket", "s3://bucket/a/b", "file:///tmp/x", "memory://x", "work/shards", "/abs/path", "a:b"]


@pytest.mark.parametrize("url", list(BAD))
def test_bad_urls_are_refused_naming_the_key(url):
    with pytest.raises(ValueError, match=BAD[url]) as e:
        check_url(url, "ingest.output")
    assert str(e.value).startswith("ingest.output") and "\n" not in str(e.value)


@pytest.mark.parametrize("url", [u for u in BAD if u])
def test_filesystem_refuses_them_and_what_join_makes_of_them(url):
    with pytest.raises(ValueError):
        filesystem(url)
    with pytest.raises(ValueError):  # "s3://" + "_parts" is "s3:/_parts": still refused
        filesystem(join(url, "_parts", "plan.json"))


@pytest.mark.parametrize("url", GOOD)
def test_good_urls_pass(url):
    assert check_url(url, "k") == url


@pytest.mark.parametrize("key, flag", [("ingest.output", "--output"), ("ingest.input", "--input")])
@pytest.mark.parametrize("url", ["s3://", "s3:///x", "gs://"])
def test_dsl_ingest_refuses_before_writing(tmp_path, monkeypatch, capsys, key, flag, url):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    other = "--input" if flag == "--output" else "--output"
    code = main(["ingest", flag, url, other, "in" if other == "--input" else "out", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"dsl ingest: error: {key} {url!r} names no bucket"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no "s3:" folder, nothing written


def test_ray_storage_refuses_a_bucketless_path():
    from dsl.contracts.storage import ray_storage

    with pytest.raises(ValueError, match="scale.storage_path 's3://' names no bucket"):
        ray_storage("s3://")


def test_clearing_s3fs_instance_cache_clears_the_bounded_filesystems_too():
    """Code (and these tests) that change AWS_ENDPOINT_URL clear s3fs's cache of instances;
    a cache of our own would keep handing out a client for the old endpoint."""
    import fsspec
    import s3fs

    first = fsspec.filesystem("s3", anon=True)
    assert fsspec.filesystem("s3", anon=True) is first and isinstance(first, s3fs.S3FileSystem)
    s3fs.S3FileSystem.clear_instance_cache()
    assert fsspec.filesystem("s3", anon=True) is not first
