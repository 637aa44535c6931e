"""``streamproc accounts add|list|remove`` and the operator routes ``/v1/accounts``.

| route | what |
|---|---|
| ``GET /v1/accounts`` | every account (the external id shown only as ``"set"`` or ``""``) |
| ``POST /v1/accounts`` | add or replace one (``AccountIn``): 201 |
| ``DELETE /v1/accounts/{id}`` | remove one: 204, or 404 |

Refusals are the ingest's JSON problems (``{"error", "detail", "path"}``): 400 with the bad
field's path, 401/403 for the token (operators only), 413/415 for the body. The CLI exits 0
when done, 1 when there is nothing to remove, 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import sys
from typing import Annotated, Any

import msgspec
import orjson
from aiohttp import web

from spot.aws import AccountStore, new_account
from streamproc.errors import ConfigError
from streamproc.ingest._http import Problem, json_response
from streamproc.keys import Keys

__all__ = ("add_routes", "register")


class AccountIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(max_length=12)]
    role_arn: Annotated[str, msgspec.Meta(max_length=2048)]
    regions: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=32)]], msgspec.Meta(min_length=1, max_length=30)
    ]
    external_id: Annotated[str, msgspec.Meta(max_length=1224)] = ""
    name: Annotated[str, msgspec.Meta(max_length=100)] = ""


# ---------------------------------------------------------------------- CLI


def _cmd_accounts(args: argparse.Namespace, cfg: Any, app: Any) -> int:
    from streamproc.cli import open_redis, run_async

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            store = AccountStore(client, Keys(cfg.redis.key_prefix))
            if args.action == "add":
                account = new_account(
                    id=args.id,
                    role_arn=args.role_arn,
                    regions=[r for v in args.regions for r in v.replace(",", " ").split()],
                    external_id=args.external_id or "",
                    name=args.name or "",
                )
                new = await store.add(account)
                print(
                    f"account {account.id} {'added' if new else 'replaced'}: role "
                    f"{account.role_arn}, regions {', '.join(account.regions)}"
                    + (", external id set" if account.external_id else "")
                )
                return 0
            if args.action == "remove":
                if not await store.remove(args.id):
                    print(f"streamproc: no account {args.id[:40]!r}", file=sys.stderr)
                    return 1
                print(f"account {args.id} removed")
                return 0
            found = await store.all()
            if args.json:
                for a in found:
                    print(orjson.dumps(a.public()).decode())
                return 0
            print(f"{'id':<13} {'name':<20} {'external id':<11} {'regions':<30} role")
            for a in found:
                print(
                    f"{a.id:<13} {a.name[:20]:<20} {'set' if a.external_id else '-':<11} "
                    f"{','.join(a.regions)[:30]:<30} {a.role_arn}"
                )
            print(f"{len(found)} account(s)")
            return 0
        finally:
            await client.aclose()

    return run_async(go())


def register(sub: Any) -> None:
    a = sub.add_parser("accounts", help="AWS accounts discovery scans: add, list, remove")
    asub = a.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = asub.add_parser("add", help="add (or replace) an account to scan")
    add.add_argument("id", help="the 12-digit account id")
    add.add_argument("--role-arn", required=True, help="arn:aws:iam::<id>:role/<name> to assume")
    add.add_argument(
        "--regions", required=True, nargs="+", action="extend", metavar="REGION", default=[]
    )
    add.add_argument("--external-id", help="the role's trust-policy external id (never shown)")
    add.add_argument("--name", help="a name for people")
    lst = asub.add_parser("list", help="list accounts (external ids never shown)")
    lst.add_argument("--json", action="store_true")
    rm = asub.add_parser("remove", help="stop scanning an account")
    rm.add_argument("id")
    a.set_defaults(func=_cmd_accounts)


# ---------------------------------------------------------------------- routes


class _Api:
    def __init__(self, ingest: Any) -> None:
        self.ingest = ingest
        self.store = AccountStore(ingest.client, ingest.keys)
        self.decoder = msgspec.json.Decoder(AccountIn)

    async def list(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        return json_response({"accounts": [a.public() for a in await self.store.all()]})

    async def add(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        self.ingest.body_format(request, allowed=("json",))
        body = await self.ingest.read_body(request)
        try:
            req = self.decoder.decode(body)
        except msgspec.ValidationError as e:
            text, _, path = str(e).partition(" - at `")
            raise Problem(400, "invalid", text, path=path.rstrip("`") or "$") from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            raise Problem(400, "malformed", f"the body is not a JSON object: {e}") from None
        try:
            account = new_account(
                id=req.id,
                role_arn=req.role_arn,
                regions=req.regions,
                external_id=req.external_id,
                name=req.name,
            )
        except ConfigError as e:
            field, _, reason = str(e).partition(": ")
            raise Problem(400, "invalid", reason or str(e), path=f"$.{field}") from None
        new = await self.store.add(account)
        return json_response({"account": account.public(), "new": new}, status=201)

    async def remove(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        account_id = request.match_info["account_id"]
        if not (len(account_id) == 12 and account_id.isascii() and account_id.isdigit()):
            raise Problem(404, "not_found", f"no account {account_id[:40]!r}")
        if not await self.store.remove(account_id):
            raise Problem(404, "not_found", f"no account {account_id!r}")
        return web.Response(status=204)


def add_routes(app: web.Application, ingest: Any) -> None:
    api = _Api(ingest)
    app.router.add_get("/v1/accounts", api.list)
    app.router.add_post("/v1/accounts", api.add)
    app.router.add_delete("/v1/accounts/{account_id}", api.remove)
