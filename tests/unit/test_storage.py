"""rayapp.storage on a local directory and on S3 (moto on 127.0.0.1, tests/s3_server.py)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

import rayapp.storage as storage
from rayapp.storage import COMPLETE, INCOMPLETE, StorageError, fetch_dir, open_output
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Mirrors and downloads go under this test's tmp_path."""
    monkeypatch.setenv("RAYAPP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def s3_uri(s3_bucket):
    return f"s3://{s3_bucket}/runs/job1"


@dataclass
class Remote:
    uri: str        # s3://BUCKET/runs/job1 or gs://BUCKET/runs/job1
    bucket: str
    server: object  # tests/s3_server.S3Server or tests/gcs_server.GCSServer (keys, endpoint)


@pytest.fixture(params=["s3", "gs"])
def remote(request) -> Remote:
    """A fresh bucket on moto's S3 or on the GCS emulator, both on 127.0.0.1."""
    server = request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
    bucket = server.create_bucket()
    return Remote(f"{request.param}://{bucket}/runs/job1", bucket, server)


def make_model_dir(path, files: dict[str, bytes]):
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def count_copies(monkeypatch):
    calls = []
    real = storage._copy_file

    def counting(src_fs, src, dst_fs, dst):
        calls.append(src)
        real(src_fs, src, dst_fs, dst)

    monkeypatch.setattr(storage, "_copy_file", counting)
    return calls


# ---- a local output_dir: the mirror is the output dir, nothing is copied ----------------------

def test_local_store_is_the_output_dir_and_copies_nothing(tmp_path, monkeypatch, private_cache):
    import pyarrow.fs

    out = tmp_path / "out"
    store = open_output(str(out))
    assert store.local == out.resolve() and out.is_dir() and not store.remote
    calls = count_copies(monkeypatch)
    store.write_json("eval.json", {"acc": 0.5})
    assert json.loads((out / "eval.json").read_text()) == {"acc": 0.5}
    make_model_dir(out / "model", {"config.json": b"{}", "model.safetensors": b"w" * 10})
    assert store.push("eval.json") == ["eval.json"]
    assert store.publish_dir("model") == str(out.resolve() / "model")
    assert store.pull("eval.json", "model", "missing.json") == ["eval.json", "model"]
    assert store.fetch_dir("model") == out.resolve() / "model" == fetch_dir(out / "model")
    assert calls == [] and not (private_cache / "mirrors").exists()
    assert store.is_complete("model") and store.exists("eval.json") and not store.exists("nope")
    assert store.list("model") == ["config.json", "model.safetensors"]
    assert store.read_json("eval.json") == {"acc": 0.5}
    kw = store.run_config_kwargs()
    assert kw["storage_path"] == str(out.resolve()) and isinstance(kw["storage_filesystem"], pyarrow.fs.LocalFileSystem)
    assert open_output(f"file://{out}").local == out.resolve()


def test_local_write_is_atomic(tmp_path, monkeypatch):
    store = open_output(tmp_path / "out")
    store.write_text("eval.json", "old\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        store.write_text("eval.json", "new\n")
    assert (tmp_path / "out" / "eval.json").read_text() == "old\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.json"]   # no temporary left


# ---- S3 ---------------------------------------------------------------------------------------

def test_round_trip(remote):
    s3_uri = remote.uri
    store = open_output(s3_uri)
    assert store.remote and store.uri == s3_uri
    store.write_json("eval.json", {"acc": 0.75})
    (store.local / "plots").mkdir()
    (store.local / "plots" / "loss.png").write_bytes(b"\x89PNG")
    (store.local / "report.html").write_text("<html></html>")
    assert sorted(store.push("report.html", "plots")) == ["plots/loss.png", "report.html"]
    assert remote.server.keys(remote.bucket) == ["runs/job1/eval.json", "runs/job1/plots/loss.png", "runs/job1/report.html"]
    other = open_output(s3_uri + "/")   # another process's view: its own mirror
    assert other.local != store.local
    assert other.read_json("eval.json") == {"acc": 0.75}
    assert other.read_text("report.html") == "<html></html>"
    assert other.list() == ["eval.json", "plots/loss.png", "report.html"]
    assert other.exists("plots") and not other.exists("model")
    with pytest.raises(StorageError, match=rf"{s3_uri}/nope.json: not found"):
        other.read_text("nope.json")
    mirror = store.local
    store.close()
    assert not mirror.exists()


def test_s3_object_is_replaced_atomically_when_the_writer_is_killed(s3_server, s3_bucket, s3_uri):
    """A process killed in the middle of an upload leaves the previous object, never part of the new one."""
    store = open_output(s3_uri)
    store.write_text("teacher/cache.jsonl", "old\n")
    child = """
import pickle, sys
store = pickle.loads(bytes.fromhex(sys.argv[1]))
store.path("teacher").mkdir()
with open(store.path("teacher/cache.jsonl"), "wb") as f:
    f.write(b"x" * (80 << 20))
print("uploading", flush=True)
store.push("teacher/cache.jsonl")
"""
    proc = subprocess.Popen([sys.executable, "-c", child, pickle.dumps(store).hex()], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "uploading"
    client = s3_server.client()
    deadline = time.monotonic() + 60
    while not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"):
        assert proc.poll() is None and time.monotonic() < deadline, "the upload finished before it could be killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert store.read_text("teacher/cache.jsonl") == "old\n"


def test_publish_dir_is_invisible_until_complete(remote, monkeypatch):
    s3_uri = remote.uri
    store = open_output(s3_uri)
    reader = open_output(s3_uri)
    real = storage._copy_file
    seen_mid_upload = []

    def observed(src_fs, src, dst_fs, dst):
        real(src_fs, src, dst_fs, dst)
        if "/model/" in dst:
            seen_mid_upload.append(reader.is_complete("model"))
            with pytest.raises(StorageError, match="incomplete"):
                reader.fetch_dir("model")

    # First version, watched file by file.
    make_model_dir(store.path("model"), {"config.json": b'{"v": 1}', "model.safetensors": b"1" * 100,
                                         "extra.txt": b"only in v1"})
    monkeypatch.setattr(storage, "_copy_file", observed)
    assert store.publish_dir("model") == f"{s3_uri}/model"
    assert seen_mid_upload == [False, False, False]
    assert reader.is_complete("model")
    manifest = json.loads(reader.read_text(f"model/{COMPLETE}"))
    assert manifest["files"] == {"config.json": 8, "extra.txt": 10, "model.safetensors": 100}

    # Second version: the upload dies after its first file.
    make_model_dir(store.path("model"), {"config.json": b'{"v": 2}', "model.safetensors": b"2" * 200})
    (store.path("model") / "extra.txt").unlink()
    uploads = []

    def dies(src_fs, src, dst_fs, dst):
        if "/model/" in dst:
            uploads.append(dst)
            if len(uploads) == 2:
                raise OSError("connection reset by peer")
        observed(src_fs, src, dst_fs, dst)

    monkeypatch.setattr(storage, "_copy_file", dies)
    with pytest.raises(StorageError, match="uploading failed"):
        store.publish_dir("model")
    assert not reader.is_complete("model")
    assert reader.exists(f"model/{INCOMPLETE}")
    with pytest.raises(StorageError, match=r"model is incomplete: .*interrupted"):
        reader.fetch_dir("model")

    # Publishing again completes it; the file v2 lacks is gone.
    monkeypatch.setattr(storage, "_copy_file", real)
    store.publish_dir("model")
    assert reader.is_complete("model")
    assert reader.list("model") == ["config.json", "model.safetensors"]
    local = reader.fetch_dir("model")
    assert (local / "config.json").read_bytes() == b'{"v": 2}'
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]


def test_pull_brings_what_a_killed_run_left(remote):
    s3_uri = remote.uri
    first = open_output(s3_uri)
    first.write_text("metrics.jsonl", '{"step": 1}\n{"step": 2}\n')
    make_model_dir(first.path("teacher"), {"rationales.jsonl": b'{"r": 1}\n', "sub/meta.json": b"{}"})
    first.push("teacher")
    first.close()

    again = open_output(s3_uri)
    assert not (again.local / "metrics.jsonl").exists()
    assert again.pull("metrics.jsonl", "teacher", "eval.json") == ["metrics.jsonl", "teacher"]
    assert (again.local / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert (again.local / "teacher" / "sub" / "meta.json").read_text() == "{}"
    assert sorted(p.name for p in (again.local / "teacher").iterdir()) == ["rationales.jsonl", "sub"]


def test_fetch_dir_downloads_once_per_content(remote, monkeypatch, private_cache):
    s3_uri = remote.uri
    store = open_output(s3_uri)
    make_model_dir(store.path("model"), {"config.json": b"{}", "model.safetensors": b"a" * 50})
    store.publish_dir("model")
    calls = count_copies(monkeypatch)

    first = fetch_dir(f"{s3_uri}/model")
    assert len(calls) == 2 and (first / "model.safetensors").read_bytes() == b"a" * 50
    assert str(first).startswith(str(private_cache / "downloads"))
    assert fetch_dir(f"{s3_uri}/model") == first and len(calls) == 2   # cached: nothing fetched

    (store.path("model") / "model.safetensors").write_bytes(b"b" * 50)   # same size, new content
    store.publish_dir("model")
    calls.clear()
    second = fetch_dir(f"{s3_uri}/model")
    assert second != first and len(calls) == 2
    assert (second / "model.safetensors").read_bytes() == b"b" * 50
    assert not first.exists()   # the older version of the same URI is removed


def test_fetch_dir_of_a_directory_uploaded_by_another_tool(s3_server, s3_bucket, monkeypatch):
    client = s3_server.client()
    for key, body in {"m/config.json": b"{}", "m/model.safetensors": b"x" * 30}.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    calls = count_copies(monkeypatch)
    first = fetch_dir(f"s3://{s3_bucket}/m")
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "model.safetensors"]
    assert fetch_dir(f"s3://{s3_bucket}/m") == first and len(calls) == 2
    time.sleep(1.1)   # S3 modification times have one-second resolution
    client.put_object(Bucket=s3_bucket, Key="m/model.safetensors", Body=b"y" * 30)
    second = fetch_dir(f"s3://{s3_bucket}/m")
    assert second != first and (second / "model.safetensors").read_bytes() == b"y" * 30 and len(calls) == 4


def test_pickled_store_carries_the_endpoint(remote):
    """Ray workers receive the store (or run_config_kwargs) pickled, possibly without the endpoint
    variable in their environment: the filesystem object must still reach the same server."""
    s3_uri = remote.uri
    store = open_output(s3_uri)
    store.write_text("config.resolved.yaml", "kind: sft\n")
    _ = store.local
    clone = pickle.loads(pickle.dumps(store))
    assert clone._mirror is None and clone.local != store.local   # its own mirror
    child = "import pickle, sys; print(pickle.loads(bytes.fromhex(sys.argv[1])).read_text('config.resolved.yaml'))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL") and k != "STORAGE_EMULATOR_HOST"}
    r = subprocess.run([sys.executable, "-c", child, pickle.dumps(store).hex()], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "kind: sft\n\n"


def test_generic_endpoint_variable_is_honoured(s3_server, s3_uri, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    store = open_output(s3_uri)
    store.write_text("a.txt", "a")
    assert store.read_text("a.txt") == "a"


# ---- errors that say what to set ----------------------------------------------------------------

@pytest.mark.parametrize("bad, expected", [
    ("hdfs://namenode/x", r"output_dir 'hdfs://namenode/x': scheme 'hdfs://' is not supported; .*s3://bucket/prefix"),
    ("s3:///prefix", r"output_dir 's3:///prefix': no bucket; write s3://BUCKET/PREFIX"),
    ("s3://b/x?endpoint_override=http://h:9000", r"query parameters are not supported; set the endpoint with AWS_ENDPOINT_URL_S3"),
])
def test_bad_output_dir(bad, expected):
    with pytest.raises(StorageError, match=expected):
        open_output(bad)


def test_missing_bucket_is_named(remote):
    scheme = remote.uri.split("://")[0]
    with pytest.raises(StorageError, match=rf"{scheme}://no-such-bucket/x: .*bucket 'no-such-bucket' does not exist"):
        open_output(f"{scheme}://no-such-bucket/x")
    if scheme == "s3":
        with pytest.raises(StorageError, match=f"at endpoint {remote.server.endpoint}"):
            open_output("s3://no-such-bucket/x")


def test_refused_credentials_say_what_to_set(s3_server, s3_uri):
    with s3_server.require_auth(), pytest.raises(StorageError, match=r"credentials missing or refused .*AWS_ACCESS_KEY_ID"):
        open_output(s3_uri)
    open_output(s3_uri)   # auth off again: the fixture is left as it was


def test_unreachable_endpoint_names_it(s3_uri, monkeypatch):
    import socket

    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError, match=rf"cannot reach endpoint http://127.0.0.1:{port}; .*set AWS_ENDPOINT_URL_S3"):
        open_output(s3_uri)


def test_gcs_without_credentials_says_what_to_set():
    """The error pyarrow gave on this machine for gs:// with no credentials and no network (a
    live probe takes 15 s, so the recorded message is classified here)."""
    seen = OSError(
        "google::cloud::Status(UNAVAILABLE: Retry policy exhausted, with a last message of Could not create a "
        "OAuth2 access token to authenticate the request. The request was not sent, as such an access token is "
        "required to complete the request successfully. ... CURL error [6]=Could not resolve hostname"
    )
    err = storage._explain(seen, "gs://bucket/runs/x", "listing")
    assert "output_dir gs://bucket/runs/x: listing failed: credentials missing or refused for gs://bucket" in str(err)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(err)
