"""The storage contract, run on both backends: a local directory and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import threading

import pytest

from service.storage import (STORE_ERRORS, LocalStore, ObjectNotFound, ObjectStore, PreconditionFailed, S3Store,
                             StoreUnavailable, open_store, parse_s3_url, validate_key)
from tests.s3server import SeaweedServer


def test_put_get_head_list_delete(store: ObjectStore) -> None:
    etag = store.put("a/b/one.bin", b"first")
    blob = store.get("a/b/one.bin")
    assert blob.data == b"first" and blob.etag == etag
    assert store.head("a/b/one.bin").size == 5 and store.head("a/b/one.bin").etag == etag
    store.put("a/two.json", b"{}")
    store.put("b/three", b"3")
    assert [o.key for o in store.list("a/")] == ["a/b/one.bin", "a/two.json"]
    assert [o.key for o in store.list()] == ["a/b/one.bin", "a/two.json", "b/three"]
    assert [o.key for o in store.list("a/b")] == ["a/b/one.bin"]
    store.delete("a/b/one.bin")
    store.delete("a/b/one.bin")  # absent is fine
    with pytest.raises(ObjectNotFound):
        store.get("a/b/one.bin")
    with pytest.raises(ObjectNotFound):
        store.head("a/b/one.bin")
    assert not store.exists("a/b/one.bin") and store.exists("b/three")


def test_put_replaces_and_changes_the_etag(store: ObjectStore) -> None:
    first = store.put("k", b"one")
    second = store.put("k", b"two")
    assert first != second and store.get("k") == type(store.get("k"))(b"two", second)


def test_create_only_and_if_match(store: ObjectStore) -> None:
    etag = store.put("ptr", b"v0001", create_only=True)
    with pytest.raises(PreconditionFailed):
        store.put("ptr", b"v0002", create_only=True)
    new = store.put("ptr", b"v0002", if_match=etag)
    assert store.get("ptr").data == b"v0002"
    with pytest.raises(PreconditionFailed):
        store.put("ptr", b"v0003", if_match=etag)  # stale ETag
    with pytest.raises(PreconditionFailed):
        store.put("missing", b"x", if_match=new)
    assert store.get("ptr").data == b"v0002"


def test_concurrent_compare_and_swap_has_one_winner(store: ObjectStore) -> None:
    etag = store.put("ptr", b"start")
    barrier, won, lost = threading.Barrier(12), [], []

    def swap(i: int) -> None:
        barrier.wait()
        try:
            store.put("ptr", f"writer-{i}".encode(), if_match=etag)
            won.append(i)
        except PreconditionFailed:
            lost.append(i)

    threads = [threading.Thread(target=swap, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 11
    assert store.get("ptr").data == f"writer-{won[0]}".encode()


def test_child_store_is_one_level_down(store: ObjectStore) -> None:
    store.child("jobs").put("x.json", b"1")
    assert [o.key for o in store.list()] == ["jobs/x.json"]
    assert store.child("jobs").get("x.json").data == b"1"


@pytest.mark.parametrize("key", ["", "/a", "a/", "a//b", "../x", "a/../b", ".hidden", "a/.tmp-x", "sp ace"])
def test_bad_keys_are_refused(key: str, store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        store.put(key, b"x")


def test_local_listing_skips_temp_files(tmp_path) -> None:
    store = LocalStore(tmp_path)
    store.put("a", b"1")
    (tmp_path / ".tmp-a.123").write_bytes(b"partial")
    assert [o.key for o in store.list()] == ["a"]


def test_urls() -> None:
    assert parse_s3_url("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    for bad in ("s3://ab/x", "s3://Bucket/x", "s3://bucket/../x", "http://bucket/x"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)
    assert isinstance(open_store("var/models"), LocalStore)
    assert validate_key("v0001/model.safetensors") == "v0001/model.safetensors"


def test_unreachable_store_fails_fast_and_is_counted(weed: str, tmp_path) -> None:
    server = SeaweedServer(tmp_path / "data", weed)  # never started: nothing listens on its port
    store = S3Store("s3://vss-test/x", server.env(), timeout_s=2.0, retries=1)
    before = STORE_ERRORS.snapshot().get("head", 0)
    with pytest.raises(StoreUnavailable, match="head 'ACTIVE' failed"):
        store.head("ACTIVE")
    assert STORE_ERRORS.snapshot().get("head", 0) == before + 1


def test_s3_store_reads_the_standard_variables(s3_server: SeaweedServer, s3_url: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    store = open_store(s3_url)
    assert isinstance(store, S3Store)
    store.put("hello", b"world")
    assert S3Store(s3_url, s3_server.env()).get("hello").data == b"world"


def test_list_prefix_need_not_end_at_a_slash(store: ObjectStore) -> None:
    for key in ("clips/0001.json", "clips/0002.json", "clips/1000.json", "jobs/x"):
        store.put(key, b"1")
    assert [o.key for o in store.list("clips/000")] == ["clips/0001.json", "clips/0002.json"]


def test_settings_keep_store_urls_and_paths_apart() -> None:
    from pathlib import Path

    from service.settings import Settings

    s = Settings(_env_file=None, model_dir="s3://vss/models", buffer_dir="s3://vss/buffer/")
    assert s.model_dir == "s3://vss/models" and s.job_root() == "s3://vss/buffer/jobs"
    local = Settings(_env_file=None, model_dir="var/m", buffer_dir="var/b")
    assert local.model_dir == Path("var/m") and local.job_root() == Path("var/b/jobs")
    assert Settings(_env_file=None).model_dir == Path("var/models")  # `make run` is unchanged
