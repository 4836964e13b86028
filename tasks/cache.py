"""Prefect's cache, keyed on the stage key and kept free of pickles.

Cache records are keyed on the stage key, not on Prefect's default (which includes the run id
and so never reuses across runs, and cannot hash tensors stably across processes anyway).
Their payload is a `Ref` written as JSON by `RefSerializer`, and a record is checked before
Prefect may read it: Prefect deserializes with whatever serializer a record names, so a
record rewritten to name `pickle` would run code on the next run. Anything but a well-formed
`pai-ref` record for the expected key is deleted, and the stage runs (the verified store
decides whether it computes).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.serializers import Serializer
from pydantic import Field

from pai_core.plan import Node
from pai_core.store import Ref

log = logging.getLogger("pai_core.cache")


def cache_key(node: Node) -> str:
    return f"pai-{node.stage}-{node.key}"


@dataclass
class StageKeyPolicy(CachePolicy):
    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        return cache_key(inputs["node"])


STAGE_KEY = StageKeyPolicy()


class RefSerializer(Serializer):
    """A task result (a small `Ref`) as JSON: nothing in a record can run code."""
    type: str = Field(default="pai-ref", frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return Ref.model_validate(obj).model_dump_json().encode()

    def loads(self, blob: bytes) -> Ref:
        return Ref.model_validate_json(blob)


def records_root() -> Path:
    """Where Prefect writes this process's cache records (the setting Prefect itself uses)."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path).expanduser()


def record_is_safe(node: Node) -> bool:
    """Whether Prefect may read this node's cache record: none, or a `pai-ref` record of this key.
    An unsafe one is removed (so the task runs instead of deserializing it)."""
    path = records_root() / cache_key(node)
    if not path.exists():
        return True
    try:
        record = json.loads(path.read_bytes())
        ok = record["metadata"]["serializer"]["type"] == "pai-ref" and \
            RefSerializer().loads(record["result"].encode()).key == node.key
    except Exception:  # noqa: BLE001 - any malformed record is simply not trusted
        ok = False
    if not ok:
        log.warning("Prefect cache record %s is not a pai-ref record of this stage: removed, not read", path)
        try:
            path.unlink()
        except OSError:
            os.replace(path, path.with_name(path.name + ".untrusted"))
    return ok
