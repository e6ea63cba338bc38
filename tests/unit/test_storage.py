"""aigc.storage against a real S3 protocol server (moto's, on a loopback port) and the local filesystem: the same
calls for both."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from aigc import storage
from aigc.storage import MARKER, StorageError


@pytest.fixture
def s3_dir(s3_server):
    """A fresh prefix in the test bucket."""
    return f"{s3_server.root}/unit-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """The same tests on a local folder and on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_dir")


def make_tree(path) -> dict[str, int]:
    (path / "sub").mkdir(parents=True)
    (path / "a.json").write_text('{"x": 1}')
    (path / "sub" / "b.bin").write_bytes(os.urandom(3000))
    return {"a.json": 8, "sub/b.bin": 3000}


def test_uri_query_is_kept_on_join_and_secrets_are_redacted():
    uri = "s3://b/runs?endpoint_override=http://127.0.0.1:9000&scheme=http&region=us-east-1"
    assert storage.join(uri, "r1", "best") == ("s3://b/runs/r1/best?endpoint_override=http://127.0.0.1:9000"
                                               "&scheme=http&region=us-east-1")
    assert storage.join("/tmp/x", "r1") == "/tmp/x/r1"
    shown = storage.redact("s3://b/p?access_key=AKIA123&secret_key=hunter2&region=eu")
    assert "hunter2" not in shown and "AKIA123" not in shown and "region=eu" in shown
    assert storage.redact("s3://AKIA123:hunter2@b/p?region=eu") == "s3://***@b/p?region=eu"
    assert storage.is_uri("gs://b/p") and not storage.is_uri("/a/b") and not storage.is_uri("file:///a")


def test_resolve_reads_the_query_as_ray_does():
    fs, path = storage.resolve("s3://b/runs/?endpoint_override=http://127.0.0.1:1&scheme=http&region=us-east-1")
    assert type(fs).__name__ == "S3FileSystem" and path == "b/runs"
    fs, path = storage.resolve("~/x")
    assert type(fs).__name__ == "LocalFileSystem" and path == os.path.expanduser("~/x")


def test_an_unknown_scheme_names_the_package_to_install():
    assert "install adlfs" in storage.scheme_problem("abfs://container/p")
    with pytest.raises(StorageError, match="no filesystem for the foo:// scheme"):
        storage.resolve("foo://b/p")
    assert storage.scheme_problem("s3://b/p") is None and storage.scheme_problem("/local") is None


def test_files_round_trip(root, tmp_path):
    storage.write_text(storage.join(root, "x", "f.txt"), "hello")
    assert storage.read_text(storage.join(root, "x", "f.txt")) == "hello"
    assert storage.exists(storage.join(root, "x")) and not storage.exists(storage.join(root, "nope"))
    assert storage.listdir(storage.join(root, "x")) == ["f.txt"] and storage.listdir(storage.join(root, "nope")) == []
    sizes = make_tree(tmp_path / "src")
    storage.upload_dir(tmp_path / "src", storage.join(root, "tree"))
    storage.download_dir(storage.join(root, "tree"), tmp_path / "back")
    assert storage._local_files(str(tmp_path / "back")) == sizes


def test_publish_is_visible_only_with_its_marker_and_fetch_verifies(root, tmp_path):
    sizes = make_tree(tmp_path / "src")
    target = storage.join(root, "model")
    with pytest.raises(StorageError, match="not a published directory"):
        storage.published_files(target)
    storage.publish_dir(tmp_path / "src", target)
    assert storage.published_files(target) == sizes
    seen = []
    local = storage.fetch_dir(target, tmp_path / "cache" / "fp1", verify=seen.append)
    assert storage._local_files(str(local)) == sizes  # the marker is not in the copy
    assert [p.name.endswith(".partial") for p in seen] == [True]  # verified before it was renamed into place
    assert storage.fetch_dir(target, local, verify=seen.append) == local and seen[-1] == local  # cached: re-verified
    # republishing hides the old copy first: a reader between the two sees no marker
    storage.publish_dir(tmp_path / "src", target)
    assert json.loads(storage.read_text(storage.join(target, MARKER)))["files"] == sizes


def test_a_tampered_or_partial_object_is_never_used(s3_dir, tmp_path):
    make_tree(tmp_path / "src")
    storage.publish_dir(tmp_path / "src", s3_dir)
    storage.write_bytes(storage.join(s3_dir, "sub", "b.bin"), b"short")  # resized behind the marker's back
    with pytest.raises(StorageError, match="differ from its"):
        storage.fetch_dir(s3_dir, tmp_path / "cache" / "fp", verify=lambda p: None)
    assert not (tmp_path / "cache" / "fp").exists() and os.listdir(tmp_path / "cache") == []  # no partial copy left

    def refuse(path):
        raise ValueError("sha256 mismatch")

    storage.publish_dir(tmp_path / "src", s3_dir)
    with pytest.raises(ValueError, match="sha256"):
        storage.fetch_dir(s3_dir, tmp_path / "cache" / "fp", verify=refuse)
    assert os.listdir(tmp_path / "cache") == []


def test_a_bad_bucket_fails_naming_the_uri_and_never_the_credentials(s3_server, monkeypatch):
    with pytest.raises(StorageError) as e:
        storage.check_writable("s3://no-such-bucket/runs")
    assert "s3://no-such-bucket/runs" in str(e.value) and "not found" in str(e.value)
    with pytest.raises(StorageError) as e:  # credentials in the URI itself are not shown either
        storage.check_writable("s3://KEYID:should-not-show@no-such-bucket/runs")
    assert "s3://***@no-such-bucket/runs" in str(e.value) and "should-not-show" not in str(e.value)
    storage.check_writable(f"{s3_server.root}/runs")  # the real bucket passes
    with monkeypatch.context() as m:  # unauthorised: without credentials the request is anonymous, and refused
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            m.delenv(var)
        m.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup to time out on
        with pytest.raises(StorageError) as e:
            storage.check_writable(f"{s3_server.root}/runs")
    msg = str(e.value)
    assert msg.startswith(f"{s3_server.root}/runs: write check failed") and "ACCESS" in msg.upper(), msg


def test_configs_take_object_store_uris_and_name_the_package_a_scheme_needs():
    from aigc.config import ConfigError, FinetuneConfig, load_config
    from aigc.search_config import SearchConfig

    assert load_config(FinetuneConfig, None, ["run.storage_path=s3://b/runs?region=eu-west-1"]).run.storage_path
    assert load_config(SearchConfig, None, ["search.storage_path=gs://b/searches"]).search.storage_path
    with pytest.raises(ConfigError, match=r"run.storage_path: abfs://c/p: no filesystem for the abfs:// scheme "
                                          r"\(install adlfs\)"):
        load_config(FinetuneConfig, None, ["run.storage_path=abfs://c/p"])


def test_each_reader_of_a_stored_checkpoint_gets_its_own_complete_copy(s3_dir, tmp_path):
    """Two readers of one checkpoint at once (two ranks resuming, best == final exported): neither's copy is
    touched by the other's download, and each is gone when its reader is done; a local one is read in place."""
    storage.write_bytes(storage.join(s3_dir, "ckpt", "ds", "optim.pt"), b"x" * 5000)
    storage.write_text(storage.join(s3_dir, "ckpt", "metrics.json"), "{}")
    fs, path = storage.resolve(storage.join(s3_dir, "ckpt"))
    ckpt = type("Checkpoint", (), {"filesystem": fs, "path": path})()  # what it reads of a ray.train.Checkpoint
    with storage.checkpoint_dir(ckpt) as a:
        with open(os.path.join(a, "ds", "optim.pt"), "rb") as held:
            with storage.checkpoint_dir(ckpt) as b:
                assert a != b and held.read() == b"x" * 5000
                assert sorted(os.listdir(b)) == ["ds", "metrics.json"]
    assert not os.path.exists(a) and not os.path.exists(b)
    local = type("Checkpoint", (), {"filesystem": storage.pafs.LocalFileSystem(), "path": str(tmp_path)})()
    with storage.checkpoint_dir(local) as d:
        assert d == str(tmp_path)
    assert tmp_path.exists()


def test_named_files_and_folders_go_up_and_come_back_and_absent_names_are_skipped(root, tmp_path):
    src = tmp_path / "src"
    sizes = make_tree(src)
    storage.push_files(src, root, ["a.json", "sub", "missing.txt"])
    back = tmp_path / "back"
    (back / "sub").mkdir(parents=True)
    (back / "sub" / "stale.bin").write_bytes(b"old")  # a pulled folder replaces what was there
    storage.pull_files(root, back, ["a.json", "missing.txt"], dirs=("sub",))
    got = {str(p.relative_to(back)): p.stat().st_size for p in back.rglob("*") if p.is_file()}
    assert got == sizes and (back / "a.json").read_text() == '{"x": 1}'
    storage.pull_files(storage.join(root, "nothing-here"), tmp_path / "empty", ["a.json"])
    assert list((tmp_path / "empty").iterdir()) == []
