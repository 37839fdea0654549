"""The jobs' storage layer against a real S3-protocol server on loopback, and token shards read from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from s3_fixtures import filled_bucket

from lmforge_jobs import shards, storage
from lmforge_jobs.entry import ConfigError
from lmforge_jobs.pretrain.testing import make_token_data


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_token_data(
        tmp_path_factory.mktemp("tokens"),
        vocab_size=320,
        documents=120,
        held_out=10,
        max_tokens_per_file=3000,
    )


@pytest.fixture(scope="module")
def remote_tokens(data: dict[str, str], s3_server: str) -> str:
    """The token shards uploaded once, to a bucket of this module's own (the tests only read them)."""
    return filled_bucket(s3_server, "t-storage-corpus", {"corpus/train": data["tokens"]}) + "/corpus/train"


def test_uris_paths_and_joins(tmp_path: Path) -> None:
    assert storage.is_remote("s3://b/k") and storage.is_remote("memory://x")
    assert not storage.is_remote("/a/b") and not storage.is_remote("file:///a/b")
    assert storage.local_path("file:///a/b") == Path("/a/b")
    assert storage.join("s3://b/", "x/", "/y") == "s3://b/x/y"
    assert storage.bucket_of("s3://b/k/l") == "s3://b" and storage.bucket_of("/tmp/x") is None
    fs, path = storage.filesystem(f"file://{tmp_path}/a/")
    assert path == f"{tmp_path}/a" and storage.to_uri(fs, path) == path
    fs, path = storage.filesystem("memory://lmforge-storage/x")
    assert storage.to_uri(fs, path) == "memory:///lmforge-storage/x"  # fsspec's memory paths are rooted


def test_endpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*storage.ENDPOINT_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    assert storage.s3_options() == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert storage.s3_endpoint() == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert storage.s3_endpoint() == "http://s3-only:2"
    monkeypatch.setenv("LMFORGE_S3_ENDPOINT", "http://minio:9000")
    monkeypatch.setenv("AWS_PROFILE", "team")
    assert storage.s3_options() == {"endpoint_url": "http://minio:9000", "profile": "team"}
    import fsspec.config

    storage.configure()  # every s3fs filesystem in the process (DCP's writer included) gets the endpoint
    assert fsspec.config.conf["s3"]["endpoint_url"] == "http://minio:9000"
    for name in (*storage.ENDPOINT_ENV, "AWS_PROFILE"):
        monkeypatch.delenv(name)
    storage.configure()
    assert "s3" not in fsspec.config.conf


def test_atomic_writes_local_and_s3(tmp_path: Path, s3) -> None:  # type: ignore[no-untyped-def]
    storage.write_text_atomic(tmp_path / "d" / "m.json", "{}")
    assert (tmp_path / "d" / "m.json").read_text() == "{}" and len(list((tmp_path / "d").iterdir())) == 1
    uri = f"{s3.uri}/run/COMPLETE"
    storage.write_text_atomic(uri, "done")
    assert s3.keys() == ["run/COMPLETE"]  # no temporary key left behind
    assert storage.exists(uri) and not storage.exists(f"{s3.uri}/run/nothing")


def test_storage_errors_name_the_field_not_the_secret(s3, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    fs, path = storage.filesystem(f"{s3.uri}/missing")
    with pytest.raises(FileNotFoundError) as missing:
        fs.cat_file(path)
    assert storage.describe(missing.value, f"{s3.uri}/missing") == f"{s3.uri}/missing does not exist"
    with pytest.raises(ConfigError, match=r"^spec\.output: bucket s3://no-such-bucket does not exist"):
        storage.check_bucket("s3://no-such-bucket/run", "output")
    storage.check_bucket(f"{s3.uri}/run", "output")  # exists and may be listed
    assert not storage.exists("s3://no-such-bucket")  # never created by the check
    s3.enforce_auth()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "zq9-secret-value")
    with pytest.raises(ConfigError) as denied:
        storage.check_bucket(f"{s3.uri}/run", "output")
    text = str(denied.value)
    assert text == f"spec.output: access denied to {s3.uri}/run (check the Secret/AWS_* credentials)"
    assert "AKIAWRONG" not in text and "zq9-secret-value" not in text


def test_remote_shards_read_like_local_ones(data: dict[str, str], remote_tokens: str, s3) -> None:  # type: ignore[no-untyped-def]
    uri = remote_tokens
    local, remote = shards.find_shards(data["tokens"]), shards.find_shards(uri)
    assert len(remote) == len(local) > 1
    assert [(s.tokens, s.token_size, s.tokenizer) for s in remote] == [
        (s.tokens, s.token_size, s.tokenizer) for s in local
    ]
    assert str(remote[0].path).startswith(f"{uri}/")
    assert [d.tolist() for d in shards.read_documents(uri)] == [
        d.tolist() for d in shards.read_documents(data["tokens"])
    ]
    assert shards.token_count(uri) == shards.token_count(data["tokens"])


def test_remote_stream_is_cached_bounded_and_prefetched(
    data: dict[str, str], remote_tokens: str, s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    uri = remote_tokens
    local = shards.TokenStream(data["tokens"])
    corpus = sum(s.tokens * s.token_size for s in local.shards)
    rng = np.random.default_rng(0)
    starts = [0, len(local) - 700, *rng.integers(0, len(local) - 700, size=40).tolist()]
    monkeypatch.setenv("LMFORGE_CACHE_BLOCK_BYTES", "1000")

    # a corpus within the budget: cached blocks, each downloaded once
    monkeypatch.setenv("LMFORGE_CACHE_BYTES", str(corpus))
    blocks = shards.TokenStream(uri, cache=str(tmp_path / "cache"))
    assert blocks.remote and not local.remote and len(blocks) == len(local)
    assert blocks.max_token() == local.max_token()
    for start in starts:  # windows across block and shard boundaries
        np.testing.assert_array_equal(blocks.window(start, 700), local.window(start, 700))
    assert blocks.downloaded <= corpus
    cache = blocks._cache
    assert cache is not None and cache.dir.parent == tmp_path / "cache"
    assert sum(f.stat().st_size for f in cache.dir.iterdir()) == blocks.downloaded

    # a larger corpus: exact ranges, prefetched ahead and consumed by the read, nothing on disk
    monkeypatch.setenv("LMFORGE_CACHE_BYTES", str(corpus // 4))
    ranges = shards.TokenStream(uri, cache=str(tmp_path / "cache"))
    before = ranges.downloaded
    ranges.prefetch([(5, 10)])
    assert ranges._cache is not None and len(ranges._cache._ranges) == 1
    for start in [5, *starts]:
        np.testing.assert_array_equal(ranges.window(start, 10), local.window(start, 10))
    assert not ranges._cache._ranges  # the prefetched range was the one read
    assert ranges.downloaded - before == 10 * 2 * (len(starts) + 1)  # nothing beyond the windows
    assert not list(ranges._cache.dir.iterdir())

    # the block cache itself stays within its budget, least recently used out first
    lru = shards.BlockCache(blocks.shards[:1], 1000, 3000, str(tmp_path / "cache"))
    for b in (0, 1, 2, 0, 3):  # 0 was used again after 1 and 2: 1 is evicted first
        lru.get(0, b)
    assert sorted(lru._blocks) == [(0, 0), (0, 2), (0, 3)]
    assert sum(f.stat().st_size for f in lru.dir.iterdir()) <= 3000
    fetched = lru.downloaded
    lru.get(0, 1)
    assert lru.downloaded == fetched + 1000

    # a missing corpus is a ShardError naming the URI, as for local paths
    with pytest.raises(shards.ShardError, match=rf"{s3.uri}/nothing does not exist"):
        shards.TokenStream(f"{s3.uri}/nothing")


def test_a_checkpoint_without_its_marker_in_s3_is_not_one(s3) -> None:  # type: ignore[no-untyped-def]
    """A save cut short mid-upload (objects of step 8 but no COMPLETE) leaves step 4 the latest."""
    from lmforge_jobs.pretrain import checkpoint as ckpt

    for key in ("step-00000004/__0_0.distcp", "step-00000004/COMPLETE", "step-00000008/__0_0.distcp"):
        s3.client.put_object(Bucket=s3.bucket, Key=f"run/checkpoints/{key}", Body=b"x")
    root = f"{s3.uri}/run/checkpoints"
    assert ckpt.list_complete(root) == [(4, f"{root}/step-00000004")]
    assert ckpt.latest(f"{s3.uri}/run/nothing-yet") is None
