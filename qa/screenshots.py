"""``screenshot.upload``: a page's PNG into S3, at ``<s3_prefix>/<session id>/<sha256>.png``.

The crawl stages each screenshot in Redis (``<p>:state:{qa}:png:<sha256>``, ``staged_ttl_s``)
and submits this task with the hash; a client may instead send the PNG in the payload
(``png_base64``). The key is the content's hash, so the upload is idempotent: a retry writes
the same bytes to the same key, and one whose staged copy is already gone finds the object
there (``HeadObject``) and answers the same URL.

boto3 runs in a worker thread with botocore's connect/read timeouts and one attempt: retries
are the task runner's, by error class (``streamproc.outbound.aws_failure``: throttling, 5xx and
timeouts are retried, AccessDenied or NoSuchBucket fail the task), behind the breaker
``s3:qa:<bucket>``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import msgspec
import redis.asyncio as aioredis

from qa import _keys
from qa.settings import QaSettings, settings
from schemas.qa import SessionId
from streamproc.breaker import Breaker
from streamproc.errors import Permanent
from streamproc.keys import Keys
from streamproc.outbound import aws_failure, guarded
from streamproc.tasks import TaskContext

__all__ = (
    "PNG_MAGIC",
    "ScreenshotUpload",
    "delete_session_objects",
    "object_url",
    "s3_breaker",
    "s3_call",
    "stage",
    "upload_screenshot",
)

T = TypeVar("T")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: The largest screenshot accepted (a full-page PNG of a long page is a few MiB).
MAX_PNG_BYTES = 10 * 2**20
_DAY_S = 86_400


class ScreenshotUpload(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Payload of ``screenshot.upload``."""

    session_id: SessionId
    #: SHA-256 of the PNG, lower-case hex: the object's name.
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    #: The PNG, base64; empty: the crawl staged it in Redis under its hash.
    png_base64: Annotated[str, msgspec.Meta(max_length=(MAX_PNG_BYTES * 4) // 3 + 4)] = ""


@functools.cache
def _client(s: QaSettings) -> Any:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    return boto3.client(
        "s3",
        endpoint_url=s.s3_endpoint_url or None,
        region_name=s.s3_region,
        config=Config(
            connect_timeout=s.s3_connect_timeout_s,
            read_timeout=s.s3_read_timeout_s,
            retries={"total_max_attempts": 1},
            s3={"addressing_style": "path"} if s.s3_endpoint_url else {},
        ),
    )


def s3_breaker(client: aioredis.Redis, keys: Keys, s: QaSettings) -> Breaker:
    return Breaker(
        client,
        keys,
        f"s3:qa:{s.s3_bucket}",
        threshold=s.breaker_threshold,
        cooldown_s=s.breaker_cooldown_s,
    )


async def s3_call(breaker: Breaker, s: QaSettings, method: str, /, **kw: Any) -> Any:
    """``method`` of the S3 client, in a thread, behind ``breaker``, failures classified."""
    fn: Callable[..., Any] = getattr(_client(s), method)

    async def call() -> Any:
        try:
            return await asyncio.to_thread(fn, **kw)
        except Exception as e:
            raise aws_failure(e, f"S3 {method}") from e

    return await guarded(breaker, call)


def object_url(s: QaSettings, key: str) -> str:
    """The URL people open: ``s3_public_url``, else the endpoint's or AWS's own URL."""
    if s.s3_public_url:
        return f"{s.s3_public_url.rstrip('/')}/{key}"
    if s.s3_endpoint_url:
        return f"{s.s3_endpoint_url.rstrip('/')}/{s.s3_bucket}/{key}"
    return f"https://{s.s3_bucket}.s3.{s.s3_region}.amazonaws.com/{key}"


async def stage(client: aioredis.Redis, keys: Keys, png: bytes) -> str:
    """Keep ``png`` in Redis for its upload task; its hash."""
    sha = hashlib.sha256(png).hexdigest()
    await client.set(_keys.staged_png(keys, sha), png, ex=settings().staged_ttl_s)
    return sha


def _payload_png(p: ScreenshotUpload) -> bytes:
    try:
        png = base64.b64decode(p.png_base64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise Permanent(f"png_base64: not base64 ({e})") from None
    if hashlib.sha256(png).hexdigest() != p.sha256:
        raise Permanent("png_base64: its SHA-256 is not the payload's sha256")
    return png


async def upload_screenshot(p: ScreenshotUpload, ctx: TaskContext) -> dict[str, Any]:
    s = settings()
    if not s.s3_bucket:
        raise Permanent("screenshots are not stored: STREAMPROC_QA_S3_BUCKET is not set")
    key = _keys.object_key(s.s3_prefix, p.session_id, p.sha256)
    url = object_url(s, key)
    breaker = s3_breaker(ctx.redis, ctx.keys, s)
    staged = _keys.staged_png(ctx.keys, p.sha256)
    png: bytes | None = _payload_png(p) if p.png_base64 else await ctx.redis.get(staged)  # type: ignore[assignment]
    if png is None:
        # Staged copy gone: uploaded by an earlier attempt (whose answer was lost), or expired.
        try:
            head = await s3_call(breaker, s, "head_object", Bucket=s.s3_bucket, Key=key)
        except Permanent as e:
            raise Permanent(
                f"screenshot {p.sha256} is neither staged (kept {s.staged_ttl_s}s) nor in "
                f"s3://{s.s3_bucket}/{key}: {e}"
            ) from None
        size = int(head.get("ContentLength", 0))
    else:
        if not png.startswith(PNG_MAGIC) or len(png) > MAX_PNG_BYTES:
            raise Permanent(f"not a PNG of at most {MAX_PNG_BYTES} bytes")
        if hashlib.sha256(png).hexdigest() != p.sha256:
            raise Permanent("the staged screenshot's SHA-256 is not the payload's sha256")
        await s3_call(
            breaker,
            s,
            "put_object",
            Bucket=s.s3_bucket,
            Key=key,
            Body=png,
            ContentType="image/png",
            CacheControl="public, max-age=31536000, immutable",
        )
        size = len(png)
    shots = _keys.screenshots(ctx.keys, p.session_id)
    async with ctx.redis.pipeline(transaction=True) as pipe:
        pipe.hset(shots, p.sha256, url)
        pipe.expire(shots, int(s.retention_days * _DAY_S) + _DAY_S)
        pipe.delete(staged)
        await pipe.execute()
    return {"url": url, "bucket": s.s3_bucket, "key": key, "bytes": size, "sha256": p.sha256}


async def delete_session_objects(breaker: Breaker, s: QaSettings, session_id: str) -> int:
    """Delete every object under the session's prefix; how many."""
    prefix = _keys.session_objects(s.s3_prefix, session_id)
    deleted = 0
    token: str | None = None
    while True:
        kw: dict[str, Any] = {"Bucket": s.s3_bucket, "Prefix": prefix, "MaxKeys": 1000}
        if token:
            kw["ContinuationToken"] = token
        page = await s3_call(breaker, s, "list_objects_v2", **kw)
        objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objects:
            answer = await s3_call(
                breaker,
                s,
                "delete_objects",
                Bucket=s.s3_bucket,
                Delete={"Objects": objects, "Quiet": True},
            )
            if errors := answer.get("Errors"):
                raise aws_failure(
                    RuntimeError(f"{len(errors)} objects not deleted: {errors[0]}"), "S3"
                )
            deleted += len(objects)
        if not page.get("IsTruncated"):
            return deleted
        token = page.get("NextContinuationToken")
