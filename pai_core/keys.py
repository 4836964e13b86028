"""Stage keys: a stage's output is named by exactly what it reads.

key = sha256(stage name, the stage's code-version salt, the spec fields the stage reads,
the keys of its upstream stages). Nothing else: not the experiment name, not the flow,
not the device. That is what lets an LTH, a PaT and a SNIP run on the same model, data
and seed share their init and pretrain artifacts.

Bump a stage's salt when its code changes what it computes; every key downstream of it
changes with it, because upstream keys are inputs.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

SALTS: dict[str, int] = {
    "init": 1,
    "train": 1,
    "score": 2,  # 2: the score artifact records the architecture (for the collapse check)
    "mask": 1,
    "iterative_mask": 1,
    "shuffle_mask": 1,
    "select": 1,
    "evaluate": 1,
}

KEY_LENGTH = 20  # hex digits: 80 bits, collision-free for any realistic store


def canonical(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same data always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def stage_key(stage: str, fields: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    if stage not in SALTS:
        raise ValueError(f"unknown stage {stage!r}; allowed: {', '.join(SALTS)}")
    payload = {"stage": stage, "salt": SALTS[stage], "fields": dict(fields), "upstream": dict(upstream)}
    return hashlib.sha256(canonical(payload).encode()).hexdigest()[:KEY_LENGTH]
