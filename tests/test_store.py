"""The artifact store: local folders and S3 (real moto servers on 127.0.0.1).

Faults are real process faults on a moto server of our own: killed (SIGKILL) and
restarted, or frozen (SIGSTOP) and continued, in the middle of an upload.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from model.contract import ArchSummary, Lineage, ModelRef
from model.digests import MANIFEST_NAME
from store import open_store
from store.local import LocalStore
from store.manifest import build_manifest
from store.s3 import S3Store, StoreError

from .conftest import free_port, wait_for_http

MiB = 1 << 20
# Multipart above 5 MiB (S3's smallest part), so a 12 MiB file goes up in 3 parts.
SMALL_PARTS = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)


def make_folder(path: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """Files of random bytes (deterministic per seed) plus nested ones: a checkpoint stand-in."""
    import random

    rng = random.Random(seed)
    for name, size in sizes.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(rng.randbytes(size))
    return path


def raw_client(endpoint: str, **config) -> boto3.client:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing", config=Config(**config) if config else None)


def count_calls(store: S3Store, *operations: str) -> dict[str, int]:
    """Count the S3 API calls the store's client makes, by operation name."""
    counts = dict.fromkeys(operations, 0)
    for op in operations:
        store.client.meta.events.register(f"before-call.s3.{op}", lambda op=op, **_: counts.__setitem__(op, counts[op] + 1))
    return counts


@pytest.fixture
def bucket(s3_env, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("FACTORY_WORK_DIR", str(tmp_path / "work"))
    name = f"store-{uuid.uuid4().hex[:10]}"
    raw_client(s3_env).create_bucket(Bucket=name)
    return name


# --------------------------------------------------------------------------------------
# Local
# --------------------------------------------------------------------------------------


def test_local_store_publishes_with_manifest_and_keeps_refs(tmp_path):
    store = LocalStore(tmp_path / "root")
    src = make_folder(tmp_path / "src", {"model.safetensors": 3000, "config.json": 50, "sub/tokenizer.json": 80})
    uri = store.publish(src, "pretrain/x/model")
    manifest = json.loads((Path(uri) / MANIFEST_NAME).read_text())
    assert manifest == build_manifest(src)
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "sub/tokenizer.json"}
    assert manifest["files"]["model.safetensors"]["size"] == 3000
    assert store.published_digest(uri) == manifest["digest"] and store.verify(uri, manifest["digest"], deep=True)
    assert store.fetch(uri) == Path(uri)

    (Path(uri) / "model.safetensors").write_bytes(b"x" * 3000)  # same size, other bytes
    assert store.verify(uri, manifest["digest"]) and not store.verify(uri, manifest["digest"], deep=True)
    (Path(uri) / "config.json").unlink()
    assert not store.verify(uri, manifest["digest"])

    ref = ModelRef(uri=uri, digest=manifest["digest"], architecture=ArchSummary(family="f", parameters=1),
                   lineage=Lineage(stage="pretrain", spec_digest="s", code_digest="c"))
    store.write_ref("pretrain/x", ref)
    assert store.read_ref("pretrain/x", ModelRef) == ref and store.read_ref("pretrain/y", ModelRef) is None
    with pytest.raises(FileNotFoundError, match="missing manifest.json"):
        store.fetch(str(tmp_path / "src"))


def test_open_store_picks_the_implementation_from_the_root_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", "s3://some-bucket/team/factory/")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: opening must not connect
    monkeypatch.setenv("FACTORY_WORK_DIR", str(tmp_path / "work"))
    store = open_store()
    assert isinstance(store, S3Store) and store.root == "s3://some-bucket/team/factory"
    assert store.uri("pretrain/m") == "s3://some-bucket/team/factory/pretrain/m"
    assert store.stage_dir("pretrain", "m") == tmp_path / "work/stages/some-bucket/team/factory/pretrain/m"
    assert isinstance(open_store(str(tmp_path / "local")), LocalStore)


# --------------------------------------------------------------------------------------
# S3: the protocol
# --------------------------------------------------------------------------------------


def test_s3_publish_fetch_verify_with_multipart(bucket, s3_env, tmp_path):
    src = make_folder(tmp_path / "src", {"model-00001.safetensors": 12 * MiB, "config.json": 700,
                                         "tokenizer/tokenizer.json": 5000})
    store = S3Store(f"s3://{bucket}/factory", transfer_config=SMALL_PARTS)
    uri = store.publish(src, "pretrain/micro/model")
    assert uri == f"s3://{bucket}/factory/pretrain/micro/model"

    raw = raw_client(s3_env)
    key = "factory/pretrain/micro/model"
    stored_manifest = json.loads(raw.get_object(Bucket=bucket, Key=f"{key}/manifest.json")["Body"].read())
    assert stored_manifest == build_manifest(src) == json.loads((LocalStore(tmp_path / "l").fetch(
        LocalStore(tmp_path / "l").publish(src, "m")) / MANIFEST_NAME).read_text())  # one format for both stores
    head = raw.head_object(Bucket=bucket, Key=f"{key}/model-00001.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # uploaded in three parts
    assert head["Metadata"]["sha256"] == stored_manifest["files"]["model-00001.safetensors"]["sha256"]

    digest = store.published_digest(uri)
    assert digest == stored_manifest["digest"] and store.verify(uri, digest) and store.verify(uri, digest, deep=True)
    local = store.fetch(uri)
    assert local == tmp_path / "work" / "artifacts" / digest
    assert (local / "tokenizer/tokenizer.json").read_bytes() == (src / "tokenizer/tokenizer.json").read_bytes()
    assert build_manifest(local)["digest"] == digest

    calls = count_calls(store, "GetObject")
    assert store.fetch(uri) == local and calls["GetObject"] == 1  # only the manifest: the copy is cached by digest

    # Someone overwrites an object with other bytes of the same size: shallow verify cannot
    # tell, deep verify and a fresh fetch (which checks every file's sha256) can.
    raw.put_object(Bucket=bucket, Key=f"{key}/config.json", Body=b"y" * 700)
    assert store.verify(uri, digest) and not store.verify(uri, digest, deep=True)
    with pytest.raises(StoreError, match="config.json does not match its manifest sha256"):
        S3Store(f"s3://{bucket}/factory", work_dir=tmp_path / "other-work").fetch(uri)
    assert store.published_digest(f"s3://{bucket}/factory/never/published") is None
    with pytest.raises(FileNotFoundError, match="missing manifest.json"):
        store.fetch(f"s3://{bucket}/factory/never/published")


def test_s3_republish_replaces_files_and_uploads_only_what_changed(bucket, s3_env, tmp_path):
    store = S3Store(f"s3://{bucket}/root", transfer_config=SMALL_PARTS)
    v1 = make_folder(tmp_path / "v1", {"a.bin": 6 * MiB, "b.bin": 100, "old.bin": 10}, seed=1)
    uri = store.publish(v1, "model")
    digest_v1 = store.published_digest(uri)

    calls = count_calls(store, "PutObject", "CreateMultipartUpload", "UploadPart", "DeleteObject")
    assert store.publish(v1, "model") == uri
    assert sum(calls.values()) == 0  # already published as is: nothing is written

    v2 = make_folder(tmp_path / "v2", {"a.bin": 6 * MiB, "b.bin": 200, "new.bin": 10}, seed=1)  # a.bin unchanged
    store.publish(v2, "model")
    assert calls["CreateMultipartUpload"] == 0  # a.bin (same sha256) stays; b.bin, new.bin and the manifest go up
    assert calls["PutObject"] == 3 and calls["DeleteObject"] == 1  # the old manifest, before any data changes
    listed = {o["Key"] for o in raw_client(s3_env).list_objects_v2(Bucket=bucket, Prefix="root/model/")["Contents"]}
    assert listed == {"root/model/a.bin", "root/model/b.bin", "root/model/new.bin", "root/model/manifest.json"}
    assert not store.verify(uri, digest_v1)
    assert store.verify(uri, build_manifest(v2)["digest"], deep=True)

    ref = ModelRef(uri=uri, digest=build_manifest(v2)["digest"], architecture=ArchSummary(family="f", parameters=1),
                   lineage=Lineage(stage="s", spec_digest="s", code_digest="c"))
    assert store.write_ref("stage/model", ref) == f"s3://{bucket}/root/refs/stage/model.json"
    assert store.read_ref("stage/model", ModelRef) == ref and store.read_ref("stage/other", ModelRef) is None


def test_published_stage_folder_reads_back_locally(bucket, tmp_path):
    """A stage folder published to S3 carries the manifest too, so its local path works as a URI
    (the data stage hands its tokenizer folder on that way)."""
    store = S3Store(f"s3://{bucket}/root")
    folder = make_folder(store.stage_dir("tokenizers", "bpe"), {"tokenizer.json": 300})
    uri = store.publish(folder, "tokenizers/bpe")
    digest = store.published_digest(uri)
    assert store.published_digest(str(folder)) == digest and store.verify(str(folder), digest)
    assert store.fetch(str(folder)) == folder
    outside = make_folder(tmp_path / "elsewhere", {"x": 1})
    store.publish(outside, "x")
    assert not (outside / MANIFEST_NAME).exists()  # folders outside the work dir are never written to


# --------------------------------------------------------------------------------------
# S3: configuration errors
# --------------------------------------------------------------------------------------


def test_missing_credentials_name_bucket_and_key(s3_server, tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store("s3://factory-bucket/runs", work_dir=tmp_path / "work")
    with pytest.raises(StoreError, match=r"s3://factory-bucket/runs: no usable AWS credentials .*AWS_ACCESS_KEY_ID"):
        store.publish(make_folder(tmp_path / "src", {"a": 1}), "model")
    with pytest.raises(StoreError, match=r"s3://factory-bucket/runs/refs/x.json: no usable AWS credentials"):
        store.read_ref("x", ModelRef)


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory):
    """A moto server that checks credentials and IAM policies: user ``factory`` may use every
    bucket except ``locked-bucket``. Yields (endpoint, access key id, secret key)."""
    server = MotoServer(tmp_path_factory.mktemp("moto-auth"))
    server.start()
    try:
        # The next 5 requests go unauthenticated (to set things up); every later one is checked.
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{server.endpoint}/moto-api/reset-auth", data=b"5",
                                                      method="POST", headers={"Content-Type": "text/plain"}))
        raw = raw_client(server.endpoint)
        raw.create_bucket(Bucket="open-bucket")
        raw.create_bucket(Bucket="locked-bucket")
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="factory")
        key = iam.create_access_key(UserName="factory")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:*", "Resource": ["arn:aws:s3:::locked-bucket", "arn:aws:s3:::locked-bucket/*"]},
        ]}
        iam.put_user_policy(UserName="factory", PolicyName="factory", PolicyDocument=json.dumps(policy))
        yield server.endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.stop()


def _use_credentials(monkeypatch, endpoint: str, key_id: str, secret: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_bad_credentials_missing_bucket_and_denied_access_are_clear(auth_s3, tmp_path, monkeypatch):
    endpoint, key_id, secret = auth_s3
    src = make_folder(tmp_path / "src", {"model.safetensors": 1000})

    _use_credentials(monkeypatch, endpoint, key_id, "wrong-secret-0123456789")
    with pytest.raises(StoreError, match=r"s3://open-bucket/runs.*rejected the AWS credentials \(SignatureDoesNotMatch\)") as e:
        S3Store("s3://open-bucket/runs", work_dir=tmp_path / "w").publish(src, "model")
    assert "wrong-secret" not in str(e.value)
    _use_credentials(monkeypatch, endpoint, "AKIAUNKNOWNKEY000000", secret)
    with pytest.raises(StoreError, match=r"rejected the AWS credentials \(InvalidAccessKeyId\)"):
        S3Store("s3://open-bucket/runs", work_dir=tmp_path / "w").read_ref("x", ModelRef)

    _use_credentials(monkeypatch, endpoint, key_id, secret)
    with pytest.raises(StoreError, match=r"s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist"):
        S3Store("s3://no-such-bucket/runs", work_dir=tmp_path / "w").publish(src, "model")
    with pytest.raises(StoreError, match=r"bucket 'no-such-bucket' does not exist"):
        S3Store("s3://open-bucket/runs", work_dir=tmp_path / "w").fetch("s3://no-such-bucket/runs/model")
    with pytest.raises(StoreError, match=r"s3://locked-bucket/runs: access denied .*bucket 'locked-bucket'"):
        S3Store("s3://locked-bucket/runs", work_dir=tmp_path / "w").publish(src, "model")
    with pytest.raises(StoreError, match=r"s3://locked-bucket/runs/model/manifest.json: access denied"):
        S3Store("s3://open-bucket/runs", work_dir=tmp_path / "w").fetch("s3://locked-bucket/runs/model")

    ok = S3Store("s3://open-bucket/runs", work_dir=tmp_path / "w")  # the same user where it is allowed
    uri = ok.publish(src, "model")
    assert ok.verify(uri, build_manifest(src)["digest"])


# --------------------------------------------------------------------------------------
# S3: the server dies or freezes in the middle of an upload
# --------------------------------------------------------------------------------------


class MotoServer:
    """A moto S3 server process of our own, which a test may kill, freeze and restart on the same port."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = folder / "moto.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT)
        wait_for_http(self.endpoint, timeout=60, process=self.process)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.thaw()
            self.process.terminate()
            self.process.wait(timeout=10)


class Reader(threading.Thread):
    """Polls an artifact the whole time, as another worker would: whenever a manifest is
    visible, every file it lists must be there at its size. Records what it saw."""

    def __init__(self, endpoint: str, bucket: str, key: str):
        super().__init__(daemon=True)
        self.client = raw_client(endpoint, connect_timeout=1, read_timeout=1, retries={"total_max_attempts": 1})
        self.bucket, self.key = bucket, key
        self.stop_event = threading.Event()
        self.partial_seen: list[str] = []
        self.whole_seen = self.errors = self.absent_seen = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                manifest = json.loads(self.client.get_object(Bucket=self.bucket, Key=f"{self.key}/manifest.json")["Body"].read())
                listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.key}/").get("Contents", [])
                sizes = {o["Key"][len(self.key) + 1 :]: o["Size"] for o in listed}
                missing = [n for n, info in manifest["files"].items() if sizes.get(n) != info["size"]]
                if missing:
                    self.partial_seen.append(f"manifest visible but {missing} missing or short")
                else:
                    self.whole_seen += 1
            except self.client.exceptions.NoSuchKey:
                self.absent_seen += 1
            except Exception:  # server down, frozen, or bucket gone: nothing readable
                self.errors += 1
            time.sleep(0.02)

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


def _wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def _publish_in_thread(store: S3Store, src: Path, key: str) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def publish():
        try:
            outcome["uri"] = store.publish(src, key)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    return thread, outcome


# Four 8 MiB shards behind a small config, throttled to ~16 MiB/s so the upload takes ~2 s.
CHECKPOINT = {"a-config.json": 2000, **{f"model-0000{i}-of-00004.safetensors": 8 * MiB for i in range(1, 5)}}
THROTTLED = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2,
                           max_bandwidth=16 * MiB)


@pytest.mark.slow  # an S3 server, killed and restarted
def test_server_killed_mid_upload_then_restarted(tmp_path, monkeypatch):
    server = MotoServer(tmp_path)
    server.start()
    try:
        _use_credentials(monkeypatch, server.endpoint, "testing", "testing")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # boto3's own setting, honoured by the store
        raw_client(server.endpoint).create_bucket(Bucket="ckpts")
        store = S3Store("s3://ckpts/factory", work_dir=tmp_path / "work", transfer_config=THROTTLED)
        src = make_folder(store.stage_dir("pretrain", "run"), CHECKPOINT)
        reader = Reader(server.endpoint, "ckpts", "factory/pretrain/run/model")
        reader.start()

        thread, outcome = _publish_in_thread(store, src, "pretrain/run/model")
        probe = raw_client(server.endpoint)
        _wait_until(lambda: probe.list_multipart_uploads(Bucket="ckpts").get("Uploads"))  # parts are going up
        server.kill()
        thread.join(timeout=120)
        error = outcome.get("error")
        assert isinstance(error, StoreError), outcome
        assert "s3://ckpts/factory/pretrain/run/model" in str(error)
        assert f"S3 endpoint {server.endpoint} unreachable after 3 attempts" in str(error)
        assert not (src / MANIFEST_NAME).exists()  # the local twin is marked published only after the remote one

        server.start()  # a fresh server on the same port; moto keeps buckets in memory, so make it again
        raw_client(server.endpoint).create_bucket(Bucket="ckpts")
        assert store.published_digest(store.uri("pretrain/run/model")) is None
        uri = store.publish(src, "pretrain/run/model")  # the same call again
        _wait_until(lambda: reader.whole_seen > 0, timeout=10)
        reader.finish()

        digest = build_manifest(src)["digest"]
        assert store.verify(uri, digest, deep=True)
        assert build_manifest(store.fetch(uri))["digest"] == digest
        assert reader.partial_seen == []
        assert reader.whole_seen > 0 and reader.errors > 0  # it read during the outage and after the retry
    finally:
        server.stop()


@pytest.mark.slow  # an S3 server, frozen
def test_server_frozen_mid_upload_leaves_no_manifest_and_retry_completes(tmp_path, monkeypatch):
    server = MotoServer(tmp_path)
    server.start()
    try:
        _use_credentials(monkeypatch, server.endpoint, "testing", "testing")
        raw_client(server.endpoint).create_bucket(Bucket="ckpts")
        # Short timeouts so a frozen server fails the upload in seconds, not minutes.
        impatient = raw_client(server.endpoint, connect_timeout=1, read_timeout=1, retries={"total_max_attempts": 2})
        store = S3Store("s3://ckpts/factory", work_dir=tmp_path / "work", transfer_config=THROTTLED, client=impatient)
        src = make_folder(tmp_path / "ckpt", CHECKPOINT)
        key = "factory/distill/run/model"
        reader = Reader(server.endpoint, "ckpts", key)
        reader.start()

        thread, outcome = _publish_in_thread(store, src, "distill/run/model")
        probe = raw_client(server.endpoint)
        _wait_until(lambda: probe.list_objects_v2(Bucket="ckpts", Prefix=key + "/").get("KeyCount", 0) >= 1)
        server.freeze()  # SIGSTOP: connections hang, nothing answers
        thread.join(timeout=120)
        server.thaw()
        error = outcome.get("error")
        assert isinstance(error, StoreError) and "s3://ckpts/factory/distill/run/model" in str(error), outcome

        time.sleep(1)  # let the server finish what it had queued while frozen
        present = {o["Key"].removeprefix(key + "/") for o in probe.list_objects_v2(Bucket="ckpts", Prefix=key + "/")["Contents"]}
        assert present and present < set(CHECKPOINT)  # some files whole, others not, and no manifest
        uri = f"s3://ckpts/{key}"
        assert store.published_digest(uri) is None
        with pytest.raises(FileNotFoundError):
            store.fetch(uri)

        retry = S3Store("s3://ckpts/factory", work_dir=tmp_path / "work", transfer_config=THROTTLED)
        calls = count_calls(retry, "PutObject", "CreateMultipartUpload")
        assert retry.publish(src, "distill/run/model") == uri
        # Files already whole (same sha256) stay; the rest go up, then the manifest.
        assert calls["PutObject"] + calls["CreateMultipartUpload"] == len(set(CHECKPOINT) - present) + 1
        _wait_until(lambda: reader.whole_seen > 0, timeout=10)
        reader.finish()
        digest = build_manifest(src)["digest"]
        assert retry.verify(uri, digest, deep=True)
        assert reader.partial_seen == [] and reader.whole_seen > 0 and reader.absent_seen > 0
    finally:
        server.stop()


# --------------------------------------------------------------------------------------
# Training checkpoints kept in the store
# --------------------------------------------------------------------------------------


def _sealed_checkpoint(root: Path, step: int, seed: int) -> Path:
    """A checkpoint folder as model/checkpoint.py seals it: files, then the COMPLETE marker."""
    from model.checkpoint import MARKER_FILE, step_folder
    from model.digests import file_digest

    folder = make_folder(step_folder(root, step), {"sharded/shard-1.safetensors": 3000, "sharded/shard-2.safetensors": 500,
                                                   "optimizer.pt": 100, "rng.pt": 50}, seed=seed)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MARKER_FILE).write_text(json.dumps(files))
    return folder


def test_checkpoints_are_mirrored_to_s3_kept_newest_and_restored_on_an_empty_disk(bucket, tmp_path):
    store = S3Store(f"s3://{bucket}/root")
    local = store.stage_dir("pretrain", "run-1") / "checkpoints"
    key = store.key_of(local)
    assert key == "pretrain/run-1/checkpoints"

    with store.mirror_checkpoints(local, keep=2) as mirror:
        mirror.poll_seconds = 0.05
        for step in (10, 20, 30):
            _sealed_checkpoint(local, step, seed=step)
            deadline = time.monotonic() + 30
            while mirror.published != f"step_{step:08d}":
                assert time.monotonic() < deadline, f"step {step} was not published"
                time.sleep(0.05)
        (local / "step_00000040").mkdir()  # a save cut short: no marker, never published
    assert store.published_under(key) == ["step_00000020", "step_00000030"]
    assert mirror.uploads == 3 and not (local / ".publishing" / "step_00000030").exists()

    # Another machine: an empty disk gets the newest checkpoint, byte for byte, marker included.
    other = S3Store(f"s3://{bucket}/root", work_dir=tmp_path / "other-machine")
    other_local = other.stage_dir("pretrain", "run-1") / "checkpoints"
    with other.mirror_checkpoints(other_local, keep=2):
        pass
    from model.checkpoint import checkpoint_problem, find_latest

    assert find_latest(other_local).step == 30 and checkpoint_problem(other_local / "step_00000030") is None
    for name in ("sharded/shard-1.safetensors", "sharded/shard-2.safetensors", "trainer_state.json", "COMPLETE"):
        assert (other_local / "step_00000030" / name).read_bytes() == (local / "step_00000030" / name).read_bytes()

    # A disk that already holds a checkpoint as new as the store's downloads nothing.
    counts = count_calls(store, "GetObject")
    with store.mirror_checkpoints(local, keep=2):
        pass
    assert counts["GetObject"] == 0


def test_a_failing_store_never_stops_the_training_it_mirrors(bucket, tmp_path, monkeypatch, capfd):
    store = S3Store(f"s3://{bucket}/root")
    local = store.stage_dir("distill", "run-2") / "checkpoints"
    failures = []

    def refuse(*args, **kwargs):
        failures.append(args)
        raise StoreError("the endpoint is down")

    monkeypatch.setattr(store, "publish", refuse)
    with store.mirror_checkpoints(local, keep=2) as mirror:
        mirror.poll_seconds = 0.05
        _sealed_checkpoint(local, 5, seed=1)
        deadline = time.monotonic() + 30
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert mirror.uploads == 0 and store.published_under(store.key_of(local)) == []
    assert "publishing step_00000005" in capfd.readouterr().err
