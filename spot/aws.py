"""AWS accounts to work on, and every call to them: assumed roles, timeouts, breakers, classes.

**Accounts** (``AccountStore``): id (12 digits), the role to assume (``arn:aws:iam::<id>:role/…``),
the regions to cover, an optional external id and a name. Stored in Redis
(``<p>:state:aws:accounts``, hash id → JSON); managed with ``streamproc accounts`` and
``/v1/accounts``.

**Calls** (``Aws.call``): each runs boto3 in a worker thread with botocore's connect/read
timeouts and one attempt (``total_max_attempts=1``: retries are the concern's, by error class),
behind a breaker per service, account and region (``aws:<service>:<account>:<region>``, shared
by every replica), and its failure is ``CallTransient`` (throttling, 5xx, timeouts) or
``CallPermanent`` (AccessDenied, a role that cannot be assumed, bad parameters): see
``streamproc.outbound``. Sessions come from STS ``AssumeRole`` on the account's role (with its
external id), cached per account until ``session_margin_s`` before they expire; clients are
cached per session, service and region.

``AwsSettings.endpoint_url`` points every service at one endpoint (a moto server); empty = AWS.
The base credentials (those that assume the roles) come from boto3's usual chain.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis

from streamproc.breaker import Breaker
from streamproc.errors import ConfigError
from streamproc.keys import Keys
from streamproc.outbound import CallPermanent, aws_failure, guarded

__all__ = ("Account", "AccountStore", "Aws", "AwsSettings", "new_account")

T = TypeVar("T")

_ACCOUNT_RE = re.compile(r"[0-9]{12}")
_ROLE_RE = re.compile(r"arn:aws[a-z-]*:iam::([0-9]{12}):role/[A-Za-z0-9+=,.@_/-]{1,512}")
_REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
_EXTERNAL_ID_RE = re.compile(r"[A-Za-z0-9+=,.@:/-]{2,1224}")


class AwsSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``STREAMPROC_AWS_<FIELD>``."""

    #: One endpoint for every service (a moto server, a proxy); empty = AWS.
    endpoint_url: str = ""
    #: Region of STS and of calls that need one before an account's regions are known.
    region: str = "us-east-1"
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 20.0
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    #: Assumed-role sessions are renewed this long before they expire.
    session_margin_s: float = 300.0
    #: Session length asked of STS.
    session_s: int = 3600

    def __post_init__(self) -> None:
        if not 0 < self.connect_timeout_s <= 600 or not 0 < self.read_timeout_s <= 600:
            raise ValueError("timeouts must be within 0..600 s")
        if not 1 <= self.breaker_threshold <= 1_000_000 or self.breaker_cooldown_s <= 0:
            raise ValueError("breaker_threshold >= 1 and breaker_cooldown_s > 0")
        if not 900 <= self.session_s <= 43_200 or not 0 <= self.session_margin_s < self.session_s:
            raise ValueError("session_s within 900..43200 and session_margin_s below it")


class Account(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    role_arn: str
    regions: tuple[str, ...]
    external_id: str = ""
    name: str = ""
    created_at: str = ""

    def public(self) -> dict[str, Any]:
        """What may be shown: the external id is a shared secret of the trust policy."""
        out = msgspec.structs.asdict(self)
        out["regions"] = list(self.regions)
        out["external_id"] = "set" if self.external_id else ""
        return out


def new_account(
    *,
    id: str,
    role_arn: str,
    regions: Any,
    external_id: str = "",
    name: str = "",
) -> Account:
    """A checked account; ``ConfigError("field: reason")`` otherwise."""
    if not isinstance(id, str) or not _ACCOUNT_RE.fullmatch(id):
        raise ConfigError(f"id: {str(id)[:40]!r} is not a 12-digit AWS account id")
    m = _ROLE_RE.fullmatch(role_arn) if isinstance(role_arn, str) else None
    if m is None:
        raise ConfigError("role_arn: expected arn:aws:iam::<account id>:role/<name>")
    if m.group(1) != id:
        raise ConfigError(f"role_arn: the role is in account {m.group(1)}, not {id}")
    if isinstance(regions, str) or not regions or len(regions) > 30:
        raise ConfigError("regions: 1 to 30 region names")
    for r in regions:
        if not isinstance(r, str) or not _REGION_RE.fullmatch(r):
            raise ConfigError(f"regions: {str(r)[:40]!r} is not a region name (eu-west-1)")
    if external_id and not _EXTERNAL_ID_RE.fullmatch(external_id):
        raise ConfigError("external_id: 2-1224 characters of letters, digits and +=,.@:/-")
    if len(name) > 100 or any(not c.isprintable() for c in name):
        raise ConfigError("name: at most 100 printable characters")
    return Account(
        id=id,
        role_arn=role_arn,
        regions=tuple(dict.fromkeys(regions)),
        external_id=external_id,
        name=name,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


class AccountStore:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client, self.keys = client, keys
        self._key = keys.state("aws", "accounts")
        self._decoder = msgspec.json.Decoder(Account)

    async def add(self, account: Account) -> bool:
        """Add or replace; True when it is new."""
        return bool(await self.client.hset(self._key, account.id, msgspec.json.encode(account)))

    async def remove(self, account_id: str) -> bool:
        return bool(await self.client.hdel(self._key, account_id))

    async def get(self, account_id: str) -> Account | None:
        raw: Any = await self.client.hget(self._key, account_id)
        return self._decoder.decode(raw) if raw else None

    async def all(self) -> list[Account]:
        raw: Any = await self.client.hgetall(self._key)
        out = []
        for v in raw.values():
            try:
                out.append(self._decoder.decode(v))
            except msgspec.DecodeError:  # written by something else: skipped, never a crash
                continue
        return sorted(out, key=lambda a: a.id)


class Aws:
    """boto3 clients per assumed-role session, and guarded calls through them."""

    def __init__(self, settings: AwsSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        #: account id -> (expiry epoch s, credentials dict)
        self._sessions: dict[str, tuple[float, dict[str, str]]] = {}
        self._clients: dict[tuple[str, str, str, str], Any] = {}
        self._base: Any = None

    def _config(self) -> Any:
        from botocore.config import Config  # type: ignore[import-untyped]

        return Config(
            connect_timeout=self.settings.connect_timeout_s,
            read_timeout=self.settings.read_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},
        )

    def _boto(self, service: str, region: str, creds: dict[str, str] | None) -> Any:
        import boto3  # type: ignore[import-untyped]

        session = boto3.session.Session(
            aws_access_key_id=creds["AccessKeyId"] if creds else None,
            aws_secret_access_key=creds["SecretAccessKey"] if creds else None,
            aws_session_token=creds["SessionToken"] if creds else None,
        )
        return session.client(
            service,
            region_name=region,
            endpoint_url=self.settings.endpoint_url or None,
            config=self._config(),
        )

    def _credentials(self, account: Account) -> dict[str, str]:
        """The account's assumed-role credentials (blocking; run in a thread)."""
        now = time.time()
        with self._lock:
            cached = self._sessions.get(account.id)
            if cached is not None and cached[0] - self.settings.session_margin_s > now:
                return cached[1]
            if self._base is None:
                self._base = self._boto("sts", self.settings.region, None)
            sts = self._base
        kwargs: dict[str, Any] = {
            "RoleArn": account.role_arn,
            "RoleSessionName": "streamproc",
            "DurationSeconds": self.settings.session_s,
        }
        if account.external_id:
            kwargs["ExternalId"] = account.external_id
        creds = sts.assume_role(**kwargs)["Credentials"]
        expiry = creds["Expiration"]
        expires = expiry.timestamp() if isinstance(expiry, datetime) else now + 900
        out = {k: creds[k] for k in ("AccessKeyId", "SecretAccessKey", "SessionToken")}
        with self._lock:
            self._sessions[account.id] = (expires, out)
            # Clients of the old session are dropped with it.
            for key in [
                k for k in self._clients if k[0] == account.id and k[3] != out["AccessKeyId"]
            ]:
                del self._clients[key]
        return out

    def client(self, account: Account | None, service: str, region: str) -> Any:
        """A client of ``service`` in ``region`` as the account's role, or with the base
        credentials themselves when ``account`` is None (blocking)."""
        if account is None:
            key = ("self", service, region, "")
            with self._lock:
                found = self._clients.get(key)
            if found is None:
                found = self._boto(service, region, None)
                with self._lock:
                    self._clients[key] = found
            return found
        creds = self._credentials(account)
        key = (account.id, service, region, creds["AccessKeyId"])
        with self._lock:
            found = self._clients.get(key)
        if found is None:
            found = self._boto(service, region, creds)
            with self._lock:
                self._clients[key] = found
        return found

    async def call(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        account: Account | None,
        service: str,
        region: str,
        fn: Callable[[Any], T],
    ) -> T:
        """``fn(client)`` in a thread, behind the breaker of (service, account, region);
        ``account`` None: the base credentials' own account (breaker ``aws:<service>:self:…``).

        Raises ``CallTransient``, ``CallPermanent`` or ``BreakerOpen`` (a Defer).
        """
        s = self.settings
        who = account.id if account is not None else "self"
        breaker = Breaker(
            redis,
            keys,
            f"aws:{service}:{who}:{region}",
            threshold=s.breaker_threshold,
            cooldown_s=s.breaker_cooldown_s,
            probe_s=s.connect_timeout_s + s.read_timeout_s + 5,
        )

        def run() -> T:
            return fn(self.client(account, service, region))

        async def attempt() -> T:
            try:
                return await asyncio.to_thread(run)
            except CallPermanent:
                raise
            except Exception as e:
                raise aws_failure(e, f"{service} {who}/{region}") from e

        return await guarded(breaker, attempt)
