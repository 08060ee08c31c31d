"""``S3Store``: artifacts under ``s3://bucket/prefix`` on any S3-compatible server, through boto3.

Configured the standard boto3 way and only that way (see ``store/__init__.py``). Uploads and
downloads go through boto3's transfer manager (multipart above 64 MiB, several parts in
flight); every operation's botocore error becomes one ``StoreError`` naming the bucket, the
key and a fix.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel
from tqdm.auto import tqdm

from model.digests import MANIFEST_NAME, file_digest
from model.fsutil import atomic_write_text
from store import REFS_DIR, work_root
from store.manifest import build_manifest, fetch_local, local_copy_is_whole, published_digest_local

MiB = 1 << 20


class StoreError(RuntimeError):
    """An artifact store operation that cannot succeed as configured; the message says where and why."""


DEFAULT_MAX_ATTEMPTS = 5  # when neither AWS_MAX_ATTEMPTS nor the profile's max_attempts says otherwise


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")`` (no leading or trailing slash)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri}; expected s3://bucket/prefix")
    return bucket, key.strip("/")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def default_transfer_config():
    """Multipart above 64 MiB in 64 MiB parts (10,000 parts: files up to 640 GiB), 8 in flight."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=8)


def s3_client():
    """An S3 client from boto3's standard configuration, with retries (jittered exponential
    backoff in botocore's ``standard`` mode) on throttling, 5xx and connection errors."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    retries = {"mode": session._session.get_config_variable("retry_mode") or "standard",
               "total_max_attempts": max_attempts(session)}
    return session.client("s3", config=Config(retries=retries))


def max_attempts(session=None) -> int:
    """AWS_MAX_ATTEMPTS or the profile's ``max_attempts`` when set, else DEFAULT_MAX_ATTEMPTS."""
    import boto3

    session = session or boto3.session.Session()
    return int(session._session.get_config_variable("max_attempts") or DEFAULT_MAX_ATTEMPTS)


class S3Store:
    """Artifacts under ``s3://bucket/prefix``; URIs are ``s3://bucket/prefix/<key>``.

    Stages work in local folders (``stage_dir``) under ``work_dir/stages/<bucket>/<prefix>``
    and read artifacts through ``fetch``, which downloads into ``work_dir/artifacts/<digest>``
    once and checks every file's sha256 against the manifest. Local paths are accepted
    wherever a URI is (a published stage folder carries its manifest too).
    """

    def __init__(self, root: str, work_dir: str | Path | None = None, transfer_config=None, client=None):
        self.bucket, self.prefix = parse_s3_uri(root)
        self.root = f"s3://{_join(self.bucket, self.prefix)}"
        self.work = Path(work_dir).expanduser().resolve() if work_dir else work_root()
        self.transfer_config = transfer_config or default_transfer_config()
        self._client = client  # created on first use: opening a store touches neither network nor credentials
        self._bucket_checked = False

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    # ----- paths and URIs

    def uri(self, key: str) -> str:
        return f"s3://{_join(self.bucket, self.prefix, key)}"

    def stage_dir(self, stage: str, name: str) -> Path:
        folder = self.work / "stages" / self.bucket / self.prefix / stage / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # ----- errors

    @contextmanager
    def _errors(self, doing: str, bucket: str, key: str) -> Iterator[None]:
        """Turn botocore's exceptions into one StoreError naming the bucket, the key and a fix."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from s3transfer.exceptions import RetriesExceededError

        where = f"s3://{_join(bucket, key)}"
        endpoint = self.client.meta.endpoint_url
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise StoreError(
                f"{doing} {where}: no usable AWS credentials ({e}). Configure boto3's credential chain: "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance/SSO role."
            ) from e
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                raise StoreError(f"{doing} {where}: bucket '{bucket}' does not exist at {endpoint}; "
                                 "create it or fix FACTORY_ARTIFACT_ROOT") from e
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                        "InvalidClientTokenId", "TokenRefreshRequired"):
                raise StoreError(f"{doing} {where}: {endpoint} rejected the AWS credentials ({code}); "
                                 "check the access key and secret boto3 found (AWS_* variables or AWS_PROFILE)") from e
            if code in ("AccessDenied", "AllAccessDisabled", "Forbidden", "403") or status == 403:
                raise StoreError(f"{doing} {where}: access denied by {endpoint}; the credentials in use "
                                 f"lack permission on bucket '{bucket}' (key '{key}')") from e
            raise StoreError(f"{doing} {where} failed at {endpoint}: {code or status} "
                             f"{e.response.get('Error', {}).get('Message', '')}".rstrip()) from e
        except (ConnectionError, HTTPClientError, RetriesExceededError) as e:
            attempts = self.client.meta.config.retries.get("total_max_attempts")
            raise StoreError(f"{doing} {where}: S3 endpoint {endpoint} unreachable after {attempts} attempts "
                             f"with backoff ({type(e).__name__}: {e})") from e
        except BotoCoreError as e:
            raise StoreError(f"{doing} {where}: {type(e).__name__}: {e}") from e

    def _check_bucket(self) -> None:
        """Before the first write: fail on a missing or forbidden bucket before uploading anything."""
        if self._bucket_checked:
            return
        with self._errors("opening", self.bucket, self.prefix):
            # A listing rather than HEAD: HEAD answers carry only a status code, a listing says
            # NoSuchBucket, AccessDenied or InvalidAccessKeyId; publishing lists the prefix anyway.
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + "/", MaxKeys=1)
        self._bucket_checked = True

    # ----- manifests

    def _read_manifest(self, bucket: str, key: str) -> dict | None:
        body = self._get(bucket, _join(key, MANIFEST_NAME), "reading the manifest of")
        return json.loads(body) if body is not None else None

    def _get(self, bucket: str, key: str, doing: str) -> bytes | None:
        """An object's bytes, or None when it does not exist (a missing bucket is an error)."""
        from botocore.exceptions import ClientError

        with self._errors(doing, bucket, key):
            try:
                return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

    def _list(self, bucket: str, prefix: str) -> dict[str, int]:
        """Relative name -> size of every object under ``prefix/``."""
        objects = {}
        with self._errors("listing", bucket, prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
                for obj in page.get("Contents", []):
                    objects[obj["Key"][len(prefix) + 1 :]] = obj["Size"]
        return objects

    # ----- the protocol

    def publish(self, local_dir: Path, key: str, known: dict[str, dict] | None = None, progress: bool = True) -> str:
        """Upload ``local_dir`` to ``<root>/<key>``: the files (multipart when large, retried),
        then stale files removed, then the manifest last. Files already there with the same
        sha256 are kept, so publishing again after a failure uploads only what is missing.
        ``known``: sizes and sha256s already computed (``build_manifest``); ``progress``: a bar."""
        from boto3.s3.transfer import ProgressCallbackInvoker, create_transfer_manager

        local_dir = Path(local_dir).resolve()
        manifest = build_manifest(local_dir, known)
        dest = _join(self.prefix, key)
        self._check_bucket()

        current = self._read_manifest(self.bucket, dest)
        if current is None or current["digest"] != manifest["digest"] or not self._objects_match(dest, manifest):
            if current is not None:  # unpublish first: no reader mixes old and new files
                with self._errors("unpublishing", self.bucket, dest):
                    self.client.delete_object(Bucket=self.bucket, Key=_join(dest, MANIFEST_NAME))
            present = self._list(self.bucket, dest)
            todo = [n for n, info in manifest["files"].items() if not self._same_object(dest, n, info, present)]
            total = sum(manifest["files"][n]["size"] for n in todo)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload {key}", disable=None if progress else True,
                      leave=False) as bar:
                with self._errors("uploading to", self.bucket, dest):
                    with create_transfer_manager(self.client, self.transfer_config) as manager:
                        futures = [manager.upload(str(local_dir / n), self.bucket, _join(dest, n),
                                                  extra_args={"Metadata": {"sha256": manifest["files"][n]["sha256"]}},
                                                  subscribers=[ProgressCallbackInvoker(bar.update)])
                                   for n in todo]
                        for future in futures:
                            future.result()
            stale = [n for n in present if n not in manifest["files"] and n != MANIFEST_NAME]
            with self._errors("removing stale files from", self.bucket, dest):
                for start in range(0, len(stale), 1000):
                    batch = [{"Key": _join(dest, n)} for n in stale[start : start + 1000]]
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            with self._errors("writing the manifest of", self.bucket, dest):
                self.client.put_object(Bucket=self.bucket, Key=_join(dest, MANIFEST_NAME),
                                       Body=json.dumps(manifest, indent=1).encode(), ContentType="application/json")
        if local_dir.is_relative_to(self.work):  # the working copy is now a published twin: readable as-is
            atomic_write_text(local_dir / MANIFEST_NAME, json.dumps(manifest, indent=1))
        return self.uri(key)

    def _same_object(self, dest: str, name: str, info: dict, present: dict[str, int]) -> bool:
        """Already uploaded: same size, and the sha256 recorded at upload equals the file's."""
        if present.get(name) != info["size"]:
            return False
        with self._errors("checking", self.bucket, _join(dest, name)):
            head = self.client.head_object(Bucket=self.bucket, Key=_join(dest, name))
        return head.get("Metadata", {}).get("sha256") == info["sha256"]

    def _objects_match(self, dest: str, manifest: dict) -> bool:
        present = self._list(self.bucket, dest)
        return all(present.get(n) == info["size"] for n, info in manifest["files"].items())

    def published_digest(self, uri: str) -> str | None:
        """The digest recorded when ``uri`` was published, or None if it never was."""
        if not uri.startswith("s3://"):
            return published_digest_local(uri)
        manifest = self._read_manifest(*parse_s3_uri(uri))
        return manifest["digest"] if manifest else None

    def verify(self, uri: str, digest: str, deep: bool = False) -> bool:
        """Manifest present with this digest and every file there at its size.

        ``deep`` streams every object and re-hashes it (slow for large checkpoints)."""
        if not uri.startswith("s3://"):
            return local_copy_is_whole(Path(uri), digest, deep)
        bucket, key = parse_s3_uri(uri)
        manifest = self._read_manifest(bucket, key)
        if manifest is None or manifest["digest"] != digest:
            return False
        present = self._list(bucket, key)
        if any(present.get(n) != info["size"] for n, info in manifest["files"].items()):
            return False
        if deep:
            import hashlib

            for name, info in manifest["files"].items():
                sha = hashlib.sha256()
                with self._errors("re-hashing", bucket, _join(key, name)):
                    for chunk in self.client.get_object(Bucket=bucket, Key=_join(key, name))["Body"].iter_chunks(MiB):
                        sha.update(chunk)
                if sha.hexdigest() != info["sha256"]:
                    return False
        return True

    def fetch(self, uri: str) -> Path:
        """A local, checked copy of the artifact at ``uri``, downloaded once per digest."""
        if not uri.startswith("s3://"):
            return fetch_local(uri)
        manifest = self._read_manifest(*parse_s3_uri(uri))
        if manifest is None:
            raise FileNotFoundError(f"no published artifact at {uri} (missing {MANIFEST_NAME})")
        dest = self.work / "artifacts" / manifest["digest"]
        if local_copy_is_whole(dest, manifest["digest"]):
            return dest
        shutil.rmtree(dest, ignore_errors=True)  # an older copy someone damaged
        return self.download(uri, dest, manifest)

    def download(self, uri: str, dest: Path, manifest: dict | None = None, progress: bool = True) -> Path:
        """The published artifact at ``uri`` into the new folder ``dest``: downloaded beside it,
        every file checked against the manifest's sha256, then renamed into place."""
        from boto3.s3.transfer import ProgressCallbackInvoker, create_transfer_manager

        bucket, key = parse_s3_uri(uri)
        manifest = manifest or self._read_manifest(bucket, key)
        if manifest is None:
            raise FileNotFoundError(f"no published artifact at {uri} (missing {MANIFEST_NAME})")
        dest = Path(dest)
        partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        total = sum(info["size"] for info in manifest["files"].values())
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {key}", disable=None if progress else True,
                  leave=False) as bar:
            with self._errors("downloading", bucket, key):
                with create_transfer_manager(self.client, self.transfer_config) as manager:
                    futures = []
                    for name in manifest["files"]:
                        (partial / name).parent.mkdir(parents=True, exist_ok=True)
                        futures.append(manager.download(bucket, _join(key, name), str(partial / name),
                                                        subscribers=[ProgressCallbackInvoker(bar.update)]))
                    for future in futures:
                        future.result()
        for name, info in manifest["files"].items():
            if file_digest(partial / name) != info["sha256"]:
                shutil.rmtree(partial, ignore_errors=True)
                raise StoreError(f"downloading {uri}: {name} does not match its manifest sha256; the artifact "
                                 "changed while it was read (republished?) or is corrupt. Fetch it again.")
        atomic_write_text(partial / MANIFEST_NAME, json.dumps(manifest, indent=1))
        try:
            partial.rename(dest)
        except OSError:  # another process downloaded the same artifact first
            shutil.rmtree(partial, ignore_errors=True)
            if not local_copy_is_whole(dest, manifest["digest"]):
                raise
        return dest

    # ----- folders of published folders (training checkpoints)

    def key_of(self, local_path: Path) -> str:
        """The key a path inside a ``stage_dir`` publishes to (its place under the stage folders)."""
        stages = self.work / "stages" / self.bucket / self.prefix
        try:
            return Path(local_path).resolve().relative_to(stages).as_posix()
        except ValueError:
            raise ValueError(f"{local_path} is not inside this store's stage folders ({stages})") from None

    def published_under(self, key: str) -> list[str]:
        """Names of the published folders directly under ``<root>/<key>`` (those with a manifest), sorted."""
        names = self._list(self.bucket, _join(self.prefix, key))
        return sorted(name.removesuffix(f"/{MANIFEST_NAME}") for name in names
                      if name.count("/") == 1 and name.endswith(f"/{MANIFEST_NAME}"))

    def remove(self, key: str) -> None:
        """Unpublish ``<root>/<key>`` (manifest first: no reader takes a half-deleted folder), then delete it."""
        dest = _join(self.prefix, key)
        with self._errors("removing", self.bucket, dest):
            self.client.delete_object(Bucket=self.bucket, Key=_join(dest, MANIFEST_NAME))
            names = list(self._list(self.bucket, dest))
            for start in range(0, len(names), 1000):
                batch = [{"Key": _join(dest, n)} for n in names[start : start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def mirror_checkpoints(self, local_dir: Path, keep: int):
        """While the body runs, every complete checkpoint written under ``local_dir`` is published
        to the store in the background, and a machine whose disk has none resumes from the store's
        newest (``store/checkpoint_mirror.py``)."""
        from store.checkpoint_mirror import CheckpointMirror

        return CheckpointMirror(self, Path(local_dir), self.key_of(local_dir), keep)

    def write_ref(self, key: str, ref: BaseModel) -> str:
        self._check_bucket()
        dest = _join(self.prefix, REFS_DIR, f"{key}.json")
        with self._errors("writing the ref", self.bucket, dest):
            self.client.put_object(Bucket=self.bucket, Key=dest, Body=ref.model_dump_json(indent=1).encode(),
                                   ContentType="application/json")
        return f"s3://{_join(self.bucket, dest)}"

    def read_ref(self, key: str, cls: type[BaseModel]) -> BaseModel | None:
        body = self._get(self.bucket, _join(self.prefix, REFS_DIR, f"{key}.json"), "reading the ref")
        return cls.model_validate_json(body) if body is not None else None
