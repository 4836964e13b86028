"""Stage keys: a stage's output is named by exactly what it reads.

key = sha256(stage name, the stage's code-version salt, the spec fields the stage reads,
the keys of its upstream stages). Nothing else: not the experiment name, not the flow,
not the device. That is what lets an LTH, a PaT and a SNIP run on the same model, data
and seed share their init and pretrain artifacts.

Bump a stage's salt (its `@stage` registration) when its code changes what it computes; every key downstream of it
changes with it, because upstream keys are inputs.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

KEY_LENGTH = 20  # hex digits: 80 bits, collision-free for any realistic store


def canonical(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same data always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def stage_key(stage: str, fields: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    from pai_core.stages import get_stage  # the registry: each stage's salt is set where it is defined

    payload = {"stage": stage, "salt": get_stage(stage).salt, "fields": dict(fields), "upstream": dict(upstream)}
    return hashlib.sha256(canonical(payload).encode()).hexdigest()[:KEY_LENGTH]
