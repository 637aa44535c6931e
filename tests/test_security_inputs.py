"""Issue 17 item 7: every string an agent can send is bounded by the schema, so no agent input
reaches Redis, a consumer or a notification unbounded."""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

from schemas import REGISTRY
from schemas.cluster import NodeNotReady


def _unbounded(t: mi.Type, path: str) -> list[str]:
    """Paths of the strings (also inside lists, dicts, unions) that have no max_length."""
    if isinstance(t, mi.StrType):
        return [] if t.max_length is not None else [path]
    if isinstance(t, mi.UnionType):
        return [p for u in t.types for p in _unbounded(u, path)]
    if isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        return _unbounded(t.item_type, f"{path}[]")
    if isinstance(t, mi.DictType):
        return _unbounded(t.key_type, f"{path}{{key}}") + _unbounded(t.value_type, f"{path}{{}}")
    if isinstance(t, mi.StructType | mi.DataclassType | mi.TypedDictType | mi.NamedTupleType):
        return [p for f in t.fields for p in _unbounded(f.type, f"{path}.{f.name}")]
    return []


POSTABLE = sorted(n for n, t in REGISTRY.by_name.items() if t.external)


@pytest.mark.parametrize("type_name", POSTABLE)
def test_every_string_an_agent_posts_has_a_max_length(type_name: str) -> None:
    info: Any = mi.type_info(REGISTRY.by_name[type_name])
    assert _unbounded(info, "$") == []


def test_a_huge_reason_is_refused_with_its_path() -> None:
    body = msgspec.json.encode(
        {
            "type": "cluster.node_not_ready",
            "cluster_id": "c1",
            "node_name": "n",
            "reason": "x" * 5000,
        }
    )
    with pytest.raises(msgspec.ValidationError, match=r"\$\.reason"):
        msgspec.json.decode(body, type=NodeNotReady)
