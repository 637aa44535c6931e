"""The optimizer and agent-metrics routes, the per-cluster policy, ``streamproc policy``.

| route | who | what |
|---|---|---|
| ``POST /clusters/{id}/optimize`` | operator, or agent scoped to it | 202: an ``optimizer.run`` |
| ``GET /clusters/{id}/optimize/{task_id}`` | the same | that task's status and result |
| ``GET /v1/clusters/{id}/policy`` | operator | the cluster's policy (the default if none) |
| ``PUT /v1/clusters/{id}/policy`` | operator | set it (a whole ``Policy``) |
| ``POST /clusters/{id}/metrics`` | agent scoped to the cluster | see ``spot.optimizer_metrics`` |

An agent is scoped to a cluster when its ``clusters`` patterns match the id. It may start and
follow optimizer runs there when it posts events at all (a viewer token — clusters, no types —
reads feeds and starts nothing), and post metrics when its ``types`` allow ``cluster.metrics``.

The optimize body is optional: ``OptimizerRun``'s fields except ``cluster_id`` (the path's),
e.g. ``{"families": ["m6i"], "dry_run": true}``.
The task is created by the task API's own path (``TaskApi.create``): the same store, events,
idempotency (``Idempotency-Key``) and metrics as ``POST /v1/tasks``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

import msgspec
import orjson
from aiohttp import web

from spot import optimizer_metrics, optimizer_pipeline
from spot.aws import Aws, AwsSettings
from spot.optimizer_metrics import cluster_path, forbidden, may_act
from spot.policy import Policy, PolicyStore, check_cluster, new_policy
from streamproc.concern import Concern
from streamproc.config import settings_from_env
from streamproc.ingest._http import Problem, idempotency_key, json_response
from streamproc.ingest.app import Ingest

__all__ = ("CONCERNS", "TASK_TYPE", "add_routes", "configure_from_env", "register")

#: The consumer groups of this part.
CONCERNS: tuple[Concern, ...] = (optimizer_metrics.CONCERN,)
TASK_TYPE = "optimizer.run"
_NEEDS = "some --types (a viewer token starts nothing)"


def configure_from_env(env: Mapping[str, str]) -> None:
    """The AWS client set the optimizer acts through (``STREAMPROC_AWS_*``)."""
    optimizer_pipeline.use_aws(Aws(settings_from_env(AwsSettings, "STREAMPROC_AWS_", env)))


def _task_marker(ingest: Ingest, task_id: str) -> str:
    """Which cluster a task started by the optimize route is for (agents may read it)."""
    return ingest.keys.state("optimizer", "task", task_id)


class _Routes:
    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self.policies = PolicyStore(ingest.client, ingest.keys)
        self._body = msgspec.json.Decoder(dict[str, Any])
        self._policy = msgspec.json.Decoder(Policy)

    async def optimize(self, request: web.Request) -> web.Response:
        ing = self.ingest
        agent = await ing.authenticate(request)
        cluster_id = cluster_path(request)
        if not may_act(agent, cluster_id, None):
            raise forbidden(agent, cluster_id, "run the optimizer", _NEEDS)
        idem = idempotency_key(request)
        body = await ing.read_body(request)
        payload: dict[str, Any] = {}
        if body.strip():  # optional: no body (whatever its Content-Type) = the policy's run
            ing.body_format(request, allowed=("json",))
            try:
                payload = self._body.decode(body)
            except msgspec.ValidationError:
                raise Problem(422, "invalid", "the body must be a JSON object", path="$") from None
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
                raise Problem(400, "malformed", f"the body is not JSON: {e}") from None
        if payload.get("cluster_id", cluster_id) != cluster_id:
            raise Problem(
                422,
                "cluster_mismatch",
                f"cluster_id {str(payload['cluster_id'])[:80]!r} differs from the path's",
                path="$.cluster_id",
            )
        payload["cluster_id"] = cluster_id
        answer = await ing.tasks.create(
            TASK_TYPE,
            payload,
            priority="high" if agent.operator else "normal",
            submitted_by=agent.name,
            idem=idem,
            payload_path="$",
        )
        await ing.client.set(_task_marker(ing, answer.id), cluster_id, ex=ing.settings.task_ttl_s)
        location = f"/clusters/{cluster_id}/optimize/{answer.id}"
        out = msgspec.to_builtins(answer)
        out.update(location=location, task_location=answer.location)
        return json_response(out, status=202, headers={"Location": location})

    async def status(self, request: web.Request) -> web.Response:
        ing = self.ingest
        agent = await ing.authenticate(request)
        cluster_id = cluster_path(request)
        if not may_act(agent, cluster_id, None):
            raise forbidden(agent, cluster_id, "run the optimizer", _NEEDS)
        task_id = request.match_info["task_id"]
        owner: Any = await ing.client.get(_task_marker(ing, task_id[:128]))
        if owner is None or owner.decode() != cluster_id:
            raise Problem(404, "not_found", f"no optimizer run {task_id[:80]!r} for {cluster_id}")
        view = await ing.tasks.store.get(task_id)
        if view is None:
            raise Problem(404, "not_found", f"optimizer run {task_id!r} expired")
        # The task API's view (GET /v1/tasks/{id}), for a token scoped to the cluster.
        return json_response(msgspec.to_builtins(view))

    async def get_policy(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        cluster_id = cluster_path(request)
        policy = await self.policies.get(cluster_id)
        return json_response({"cluster_id": cluster_id, "policy": msgspec.to_builtins(policy)})

    async def put_policy(self, request: web.Request) -> web.Response:
        agent = await self.ingest.authenticate(request, operator=True)
        cluster_id = cluster_path(request)
        self.ingest.body_format(request, allowed=("json",))
        body = await self.ingest.read_body(request)
        try:
            policy = self._policy.decode(body)
        except msgspec.ValidationError as e:
            text, _, path = str(e).partition(" - at `")
            raise Problem(422, "invalid", text, path=path.rstrip("`") or "$") from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            raise Problem(400, "malformed", f"the body is not a JSON object: {e}") from None
        policy = msgspec.structs.replace(policy, updated_by=agent.name)
        await self.policies.put(cluster_id, policy)
        return json_response({"cluster_id": cluster_id, "policy": msgspec.to_builtins(policy)})


def add_routes(app: web.Application, ingest: Ingest) -> None:
    """Its routes on the ingest service."""
    r = _Routes(ingest)
    app.router.add_post("/clusters/{cluster_id}/optimize", r.optimize)
    app.router.add_get("/clusters/{cluster_id}/optimize/{task_id}", r.status)
    app.router.add_get("/v1/clusters/{cluster_id}/policy", r.get_policy)
    app.router.add_put("/v1/clusters/{cluster_id}/policy", r.put_policy)
    optimizer_metrics.add_routes(app, ingest)


# ---------------------------------------------------------------------- CLI


def _cmd_policy(args: argparse.Namespace, cfg: Any, app: Any) -> int:
    from streamproc.cli import open_redis, run_async
    from streamproc.errors import ConfigError
    from streamproc.keys import Keys

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            store = PolicyStore(client, Keys(cfg.redis.key_prefix))
            if args.action == "list":
                for cluster, p in (await store.all()).items():
                    print(orjson.dumps({"cluster_id": cluster, **msgspec.to_builtins(p)}).decode())
                return 0
            try:
                check_cluster(args.cluster)
                if args.action == "show":
                    p = await store.get(args.cluster)
                elif args.action == "remove":
                    return 0 if await store.remove(args.cluster) else 1
                else:
                    fields = msgspec.to_builtins(await store.get(args.cluster))
                    if args.families is not None:
                        fields["families"] = [
                            f for v in args.families for f in v.replace(",", " ").split()
                        ]
                    if args.max_spot_share is not None:
                        fields["max_spot_share"] = args.max_spot_share
                    if args.dry_run is not None:
                        fields["dry_run"] = args.dry_run
                    fields["updated_by"] = "cli"
                    p = new_policy(**fields)
                    await store.put(args.cluster, p)
            except ConfigError as e:
                print(f"streamproc: {e}", file=sys.stderr)
                return 2
            print(orjson.dumps({"cluster_id": args.cluster, **msgspec.to_builtins(p)}).decode())
            return 0
        finally:
            await client.aclose()

    return run_async(go())


def register(sub: Any) -> None:
    """``streamproc policy set|show|list|remove``."""
    p = sub.add_parser("policy", help="the optimizer's per-cluster policy (families, spot share)")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = psub.add_parser("set", help="change some of a cluster's policy; prints it")
    s.add_argument("cluster")
    s.add_argument("--families", nargs="+", metavar="F", help="instance families: m5 c6i ...")
    s.add_argument("--max-spot-share", type=float, help="0..1 of the running instances")
    dry = s.add_mutually_exclusive_group()
    dry.add_argument("--dry-run", dest="dry_run", action="store_true", default=None)
    dry.add_argument(
        "--act", dest="dry_run", action="store_false", help="let the optimizer change ASGs"
    )
    psub.add_parser("show", help="a cluster's policy (the default if none)").add_argument("cluster")
    psub.add_parser("remove", help="back to the default policy").add_argument("cluster")
    psub.add_parser("list", help="every cluster's policy, as JSON lines")
    p.set_defaults(func=_cmd_policy)
