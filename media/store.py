"""The object store of renders and media jobs: a local folder or an S3 bucket (and prefix).

Moved here from ``consumers.renders`` (which re-exports it) and extended for media files:

- ``put(key, data)`` / ``read(location)``: small artefacts as bytes (renders, reports).
- ``local_copy(source, work_dir)``: a job's input as a local file: the file itself in a local
  store, a streamed download (ranged GETs, ``download_file``) into ``work_dir`` from S3.
- ``upload(path, key, content_type)``: an output written back from a file, with its content
  type; S3 uploads go through ``upload_file`` (multipart above ``part_size_bytes``). Nothing
  here reads a media file into memory.

A *location* is what ``put``/``upload`` return: ``file:///abs/path`` or ``s3://bucket/key``.
A job's source may be a location or a *key* relative to the store (``uploads/in.mp4``).
Every location is checked to be inside the store (its folder; its bucket and prefix) and a key
may not climb out of it (``..``), so an event never makes a worker read elsewhere.

Blocking calls: run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import mimetypes
import shutil
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from streamproc.errors import ConfigError

__all__ = (
    "CONTENT_TYPES",
    "LocalStore",
    "S3Store",
    "Store",
    "content_type_of",
    "open_store",
    "output_key",
)

#: Content types of the files media jobs write (``mimetypes`` does not know ``.mkv`` everywhere).
CONTENT_TYPES: dict[str, str] = {
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".jpg": "image/jpeg",
    ".png": "image/png",
    ".srt": "application/x-subrip",
    ".vtt": "text/vtt",
    ".wav": "audio/wav",
    ".json": "application/json",
}


def content_type_of(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def output_key(kind: str, job_id: str, name: str) -> str:
    """Store key of a media job's output: ``media/<kind>/<job id>/<name>``."""
    return f"media/{kind}/{job_id}/{name}"


def _checked_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or {".", "..", ""} & set(parts):
        raise ValueError(f"{key!r} is not a key inside the store (no '..', '.', '//', leading '/')")
    return key


class Store(Protocol):
    def put(self, key: str, data: bytes) -> str: ...

    def read(self, location: str) -> bytes:
        """The bytes at a location ``put`` returned. Raises ``FileNotFoundError`` when there is
        nothing there, ``ValueError`` when the location is not in this store (its folder, its
        bucket and prefix): a location from an event is never read from elsewhere."""
        ...

    def local_copy(self, source: str, work_dir: Path) -> Path:
        """A local file with the bytes of ``source`` (a location or a key): read it, do not
        change it. ``FileNotFoundError`` / ``ValueError`` as ``read``."""
        ...

    def upload(self, path: Path, key: str, content_type: str) -> str:
        """Write the file at ``path`` to ``key``; its location."""
        ...


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / _checked_key(key)

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: a retried job overwrites, a reader never sees half
        return path.resolve().as_uri()

    def _resolve(self, location: str) -> Path:
        u = urllib.parse.urlsplit(location)
        if u.scheme != "file" or u.netloc not in ("", "localhost"):
            raise ValueError(f"{location!r} is not a file:// URI")
        path = Path(urllib.request.url2pathname(u.path)).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"{location!r} is outside the render store {str(self.root)!r}")
        return path

    def read(self, location: str) -> bytes:
        return self._resolve(location).read_bytes()

    def local_copy(self, source: str, work_dir: Path) -> Path:
        path = self._resolve(source) if "://" in source else self._path(source).resolve()
        if not path.is_relative_to(self.root.resolve()):  # a symlink out of the store
            raise ValueError(f"{source!r} is outside the store {str(self.root)!r}")
        if not path.is_file():
            raise FileNotFoundError(f"no object {source!r} in the store {str(self.root)!r}")
        return path  # read in place: no copy of a local file

    def upload(self, path: Path, key: str, content_type: str) -> str:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".tmp")
        shutil.copyfile(path, tmp)  # chunked copy (sendfile), never the whole file in memory
        tmp.replace(dest)
        return dest.resolve().as_uri()


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str,
        region: str,
        part_size_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        import boto3  # type: ignore[import-untyped]
        from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region)
        #: Multipart above one part (S3's minimum part is 5 MiB), 4 parts in flight.
        self.transfer: Any = TransferConfig(
            multipart_threshold=part_size_bytes,
            multipart_chunksize=part_size_bytes,
            max_concurrency=4,
        )

    def _full(self, key: str) -> str:
        key = _checked_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> str:
        full = self._full(key)
        ctype = mimetypes.guess_type(key)[0] or "application/octet-stream"
        self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType=ctype)
        return f"s3://{self.bucket}/{full}"

    def _key_of(self, location: str) -> str:
        bucket, _, key = location.removeprefix("s3://").partition("/")
        inside = key.startswith(f"{self.prefix}/") if self.prefix else bool(key)
        inside = inside and not {".", ".."} & set(key.split("/"))  # no way out of the prefix
        if not location.startswith("s3://") or bucket != self.bucket or not inside:
            raise ValueError(
                f"{location!r} is not in the render store s3://{self.bucket}/{self.prefix}"
            )
        return key

    def read(self, location: str) -> bytes:
        key = self._key_of(location)
        try:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except self.client.exceptions.NoSuchKey as e:
            raise FileNotFoundError(f"no object {location}") from e

    def local_copy(self, source: str, work_dir: Path) -> Path:
        from botocore.exceptions import ClientError  # type: ignore[import-untyped]

        key = self._key_of(source) if "://" in source else self._full(source)
        dest = work_dir / ("input" + PurePosixPath(key).suffix.lower()[:16])
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, key, str(dest), Config=self.transfer)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no object s3://{self.bucket}/{key}") from e
            raise
        return dest

    def upload(self, path: Path, key: str, content_type: str) -> str:
        full = self._full(key)
        self.client.upload_file(
            str(path),
            self.bucket,
            full,
            ExtraArgs={"ContentType": content_type},
            Config=self.transfer,
        )
        return f"s3://{self.bucket}/{full}"


def open_store(location: str, *, endpoint_url: str = "", region: str = "us-east-1") -> Store:
    """``s3://bucket/prefix`` (``endpoint_url`` for moto/MinIO) or a folder (``file://``
    optional)."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[5:].partition("/")
        if not bucket:
            raise ConfigError(f"store {location!r}: no bucket")
        return S3Store(bucket, prefix, endpoint_url=endpoint_url, region=region)
    return LocalStore(Path(location.removeprefix("file://")))
