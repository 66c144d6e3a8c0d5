"""S3 (and S3-compatible) transfers: download a prefix into a cache once, publish a folder atomically.

Credentials come only from the environment (pods get AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the Secret named
in spec.s3.credentialsSecret, by reference) and never appear in messages. Publishing uploads every file, then writes
COMPLETE.json last: a reader that checks the marker never sees a partial folder, and a folder that already has one
is never overwritten. Errors say whether retrying can help (`S3Error.permanent`).

The trainer uses it through lorafinetune.trainer.remote (inputs into the cache, outputs mirrored from its run folder).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lorafinetune.api.uris import parse_uri
from lorafinetune.contract import COMPLETE_MARKER

T = TypeVar("T")

DOWNLOAD_MANIFEST = ".lft-download.json"  # key -> (size, etag) of what a cache folder holds
_CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}


class S3Error(RuntimeError):
    """A transfer that failed; `permanent` says retrying cannot help (bad credentials, missing bucket or object).
    `kind` is one of: credentials, bucket, object, exists, unsafe (a key that would land outside its folder),
    transient."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind
        self.permanent = kind != "transient"


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        u = parse_uri(uri, ("s3",))
        return cls(u.location, u.path)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def local_relative(key: str, prefix: str) -> str | None:
    """Where the object `key`, listed under `prefix`, goes inside a local copy of the prefix: a relative path, or None
    for a folder placeholder (a key ending in "/", as consoles create). S3 keys are free-form; one whose path would
    land outside the copy or collide with another ('..', '.' or empty segments, a backslash or NUL) or with the
    copy's own bookkeeping is refused, never written."""
    if key.endswith("/"):
        return None
    if not prefix:
        relative = key
    elif key == prefix:  # the prefix names one object
        relative = key.rsplit("/", 1)[-1]
    else:
        relative = key[len(prefix.rstrip("/")) + 1 :]
    parts = relative.split("/")
    unsafe = any(p in ("", ".", "..") for p in parts) or "\\" in relative or "\0" in relative
    if unsafe or relative == DOWNLOAD_MANIFEST:
        raise S3Error(f"refusing to download object key {key!r}: its path under {prefix!r} would not stay a plain "
                      f"file inside the destination folder", "unsafe")  # fmt: skip
    return relative


def _child_name(name: str) -> bool:
    """A listed sub-folder name usable as one local path segment."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


class S3Store:
    def __init__(self, endpoint_url: str | None = None, region: str | None = None, attempts: int = 4,
                 backoff_seconds: float = 1.0, multipart_threshold: int = 64 << 20):  # fmt: skip
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        config = Config(
            retries={"max_attempts": attempts, "mode": "standard"},  # botocore retries throttling and 5xx
            connect_timeout=5,
            read_timeout=60,
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
        )
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold)
        self.attempts, self.backoff = attempts, backoff_seconds

    # ------------------------------------------------------------------ errors and retries
    def _translate(self, err: Exception, what: str) -> S3Error:
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(err, NoCredentialsError):
            return S3Error(f"{what}: no S3 credentials (set spec.s3.credentialsSecret)", "credentials")
        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            if code in _CREDENTIAL_CODES or code == "403":
                return S3Error(f"{what}: the S3 credentials were rejected ({code})", "credentials")
            if code in ("NoSuchBucket",):
                return S3Error(f"{what}: the bucket does not exist", "bucket")
            if code in ("NoSuchKey", "404"):
                return S3Error(f"{what}: no such object", "object")
            return S3Error(f"{what}: {code or type(err).__name__}", "transient")
        return S3Error(f"{what}: {type(err).__name__}: {err}", "transient")

    def _retry(self, what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call `call(*args, **kwargs)`, retrying transient failures with exponential backoff; permanent ones raise
        at once."""
        attempt = 1
        while True:
            try:
                return call(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - translated into S3Error below
                failure = self._translate(err, what)
                if failure.permanent or attempt >= self.attempts:
                    raise failure from None
                time.sleep(self.backoff * 2 ** (attempt - 1))
                attempt += 1

    # ------------------------------------------------------------------ reading
    def _objects(self, loc: S3Location) -> list[dict]:
        """Objects in the folder `loc` names: the key equal to its prefix, and keys under prefix + "/" (a listing by
        the bare prefix would also return a sibling such as models/m2/... for models/m)."""

        def page_all() -> list[dict]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix)
            folder = loc.prefix.rstrip("/") + "/"
            return [o for page in pages for o in page.get("Contents", [])
                    if not loc.prefix or o["Key"] == loc.prefix or o["Key"].startswith(folder)]  # fmt: skip

        return self._retry(f"listing {loc}", page_all)

    def is_complete(self, uri: str) -> bool:
        loc = S3Location.parse(uri)
        try:
            self.client.head_object(Bucket=loc.bucket, Key=loc.key(COMPLETE_MARKER))
            return True
        except Exception as err:  # noqa: BLE001
            failure = self._translate(err, f"checking {uri}")
            if failure.kind == "object":
                return False
            raise failure from None

    def read_json(self, uri: str) -> dict | None:
        """A small JSON object (markers), or None when it does not exist."""
        loc = S3Location.parse(uri)
        try:
            body = self.client.get_object(Bucket=loc.bucket, Key=loc.prefix)["Body"].read()
        except Exception as err:  # noqa: BLE001
            failure = self._translate(err, f"reading {uri}")
            if failure.kind == "object":
                return None
            raise failure from None
        return json.loads(body)

    def write_json(self, uri: str, data: dict) -> None:
        """A small JSON object (an attempt's claim), replaced whole."""
        loc = S3Location.parse(uri)
        body = json.dumps(data).encode()
        self._retry(f"writing {uri}", lambda: self.client.put_object(Bucket=loc.bucket, Key=loc.prefix, Body=body))

    def complete_children(self, uri: str) -> list[str]:
        """Names of the sub-folders of `uri` that hold a COMPLETE.json (e.g. checkpoints)."""
        loc = S3Location.parse(uri)
        suffix = f"/{COMPLETE_MARKER}"
        keys = [o["Key"] for o in self._objects(S3Location(loc.bucket, loc.prefix + "/"))]
        names = (k[len(loc.prefix) + 1 : -len(suffix)] for k in keys if k.endswith(suffix))
        return sorted(n for n in names if _child_name(n))

    def child_folders(self, uri: str) -> list[str]:
        """Names of the immediate sub-folders of `uri`, complete or not."""
        loc = S3Location.parse(uri)
        keys = [o["Key"][len(loc.prefix) + 1 :] for o in self._objects(S3Location(loc.bucket, loc.prefix + "/"))]
        return sorted({k.split("/", 1)[0] for k in keys if "/" in k and _child_name(k.split("/", 1)[0])})

    def download_file(self, uri: str, dest: Path) -> Path:
        """One object into `dest` (a file path), skipped when the cached copy has the same size and ETag."""
        loc = S3Location.parse(uri)
        head = self._retry(f"reading {uri}", lambda: self.client.head_object(Bucket=loc.bucket, Key=loc.prefix))
        stamp = dest.with_name(dest.name + ".etag")
        fingerprint = f"{head['ContentLength']} {head['ETag']}"
        if dest.is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        self._retry(
            f"downloading {uri}",
            lambda: self.client.download_file(loc.bucket, loc.prefix, str(partial), Config=self.transfer),
        )
        os.replace(partial, dest)
        stamp.write_text(fingerprint)
        return dest

    def download_prefix(self, uri: str, dest: Path) -> Path:
        """Mirror every object under `uri` into `dest`, skipping files already there with the same size and ETag."""
        loc = S3Location.parse(uri)
        objects = self._objects(loc)
        if not objects:
            raise S3Error(f"{uri}: no objects under this prefix", "object")
        dest.mkdir(parents=True, exist_ok=True)
        manifest_path = dest / DOWNLOAD_MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        wanted = [(obj, local_relative(obj["Key"], loc.prefix)) for obj in objects]  # refuse before writing any
        for obj, relative in wanted:
            if relative is None:
                continue
            target = dest / relative
            fingerprint = [obj["Size"], obj["ETag"]]
            if target.is_file() and manifest.get(relative) == fingerprint and target.stat().st_size == obj["Size"]:
                continue  # cached and unchanged
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            self._retry(
                f"downloading s3://{loc.bucket}/{obj['Key']}",
                self.client.download_file, loc.bucket, obj["Key"], str(partial), Config=self.transfer,
            )
            if partial.stat().st_size != obj["Size"]:
                raise S3Error(f"s3://{loc.bucket}/{obj['Key']}: size mismatch after download", "transient")
            os.replace(partial, target)
            manifest[relative] = fingerprint
            manifest_path.write_text(json.dumps(manifest))
        return dest

    # ------------------------------------------------------------------ publishing
    def publish_dir(self, local: Path, uri: str, on_file: Callable[[str], None] | None = None) -> int:
        """Upload `local` under `uri`, COMPLETE.json last. Refuses a destination that is already complete.
        Returns the number of files uploaded."""
        if self.is_complete(uri):
            raise S3Error(f"{uri} already holds a complete upload; it is never overwritten", "exists")
        count = self.upload_files(local, uri, on_file)
        self.mark_complete(local, uri, default={"files": count})
        return count

    def upload_files(self, local: Path, uri: str, on_file: Callable[[str], None] | None = None) -> int:
        """Upload every file of `local` except COMPLETE.json (several writers may fill one prefix, e.g. one per
        node of a multi-node checkpoint; one of them marks it complete afterwards)."""
        loc = S3Location.parse(uri)
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
        for path in files:
            relative = path.relative_to(local).as_posix()
            self._retry(
                f"uploading {relative} to {uri}",
                self.client.upload_file, str(path), loc.bucket, loc.key(relative), Config=self.transfer,
            )
            if on_file:
                on_file(relative)
        return len(files)

    def mark_complete(self, local: Path, uri: str, default: dict | None = None) -> None:
        """Write `uri`/COMPLETE.json (the local one if present, else `default`): readers now see the folder."""
        loc = S3Location.parse(uri)
        marker = local / COMPLETE_MARKER
        body = marker.read_bytes() if marker.is_file() else json.dumps(default or {}).encode()
        self._retry(
            f"marking {uri} complete",
            lambda: self.client.put_object(Bucket=loc.bucket, Key=loc.key(COMPLETE_MARKER), Body=body),
        )

    def delete_folder(self, uri: str) -> int:
        """Delete everything under `uri`, COMPLETE.json first so that an interrupted delete never leaves a folder
        that looks complete. Returns the number of objects deleted."""
        loc = S3Location.parse(uri)
        keys = [o["Key"] for o in self._objects(S3Location(loc.bucket, loc.prefix + "/"))]
        keys.sort(key=lambda k: not k.endswith(f"/{COMPLETE_MARKER}"))
        for key in keys:
            self._retry(f"deleting {key}", self.client.delete_object, Bucket=loc.bucket, Key=key)
        return len(keys)
