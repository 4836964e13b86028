"""Content-addressed artifact store: one file per stage output, named by its stage key.

Layout: `<root>/<stage>/<key>.pt` (torch.save payload) beside `<key>.json` (sha256,
size, provenance, small info such as metrics). The JSON is written last and atomically,
so its presence means the payload is complete. A reused artifact is verified against its
sha256; a missing or corrupt one is moved aside and reported absent, so it is recomputed,
never trusted. Training checkpoints live beside it as `<key>.ckpt.pt` until the stage ends.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, SerializeAsAny, ValidationError, model_validator

from pai_core.infos import Info

log = logging.getLogger("pai_core.store")


class Ref(BaseModel):
    """What tasks pass around instead of tensors: small, picklable, JSON-able. Its `info` is
    the stage's typed info (TrainInfo, EvalInfo, MaskInfo...), chosen by `stage`."""

    stage: str
    key: str
    sha256: str
    info: SerializeAsAny[Info] = Info()
    computed: bool = False  # True only in the call that computed it

    @model_validator(mode="before")
    @classmethod
    def _typed_info(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("info"), dict):
            from pai_core.stages import get_stage, stage_names

            kind = get_stage(data["stage"]).info if data.get("stage") in stage_names() else Info
            data = {**data, "info": kind.model_validate(data["info"])}
        return data


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._verified: dict[Path, tuple[int, int, str]] = {}  # path -> (mtime_ns, size, sha)

    def payload_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.pt"

    def meta_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.json"

    def checkpoint_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.ckpt.pt"

    # ------------------------------------------------------------------ write
    def put(self, stage: str, key: str, payload: Any, info: Info | dict[str, Any] | None = None,
            provenance: dict[str, Any] | None = None) -> Ref:
        data = to_bytes(payload)
        sha = hashlib.sha256(data).hexdigest()
        atomic_write(self.payload_path(stage, key), data)
        meta = {
            "stage": stage, "key": key, "sha256": sha, "size": len(data),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "info": info.model_dump(mode="json") if isinstance(info, BaseModel) else dict(info or {}),
            "provenance": provenance or {},
        }
        atomic_write(self.meta_path(stage, key), json.dumps(meta, indent=1, default=str).encode())
        self.checkpoint_path(stage, key).unlink(missing_ok=True)
        return Ref(stage=stage, key=key, sha256=sha, info=meta["info"], computed=True)

    # ------------------------------------------------------------------- read
    def get(self, stage: str, key: str) -> Ref | None:
        """The verified artifact, or None if absent or corrupt (a corrupt one is set aside)."""
        meta_path, path = self.meta_path(stage, key), self.payload_path(stage, key)
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._quarantine(stage, key, "unreadable metadata")
            return None
        if not path.exists():
            self._quarantine(stage, key, "payload missing")
            return None
        if self._sha(path) != meta.get("sha256"):
            self._quarantine(stage, key, "sha256 mismatch")
            return None
        try:
            return Ref(stage=stage, key=key, sha256=meta["sha256"], info=meta.get("info", {}))
        except ValidationError:  # written by other code than this stage's: not trusted
            self._quarantine(stage, key, "metadata does not match the stage's info type")
            return None

    def load(self, ref: Ref) -> Any:
        """Load a payload, checking its bytes against the ref's sha256 (one read, one hash)."""
        data = self.payload_path(ref.stage, ref.key).read_bytes()
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            self._quarantine(ref.stage, ref.key, "sha256 mismatch on load")
            raise CorruptArtifact(f"{ref.stage}/{ref.key}: contents changed after it was stored")
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")

    def _sha(self, path: Path) -> str:
        st = path.stat()
        cached = self._verified.get(path)
        if cached and cached[:2] == (st.st_mtime_ns, st.st_size):
            return cached[2]
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        self._verified[path] = (st.st_mtime_ns, st.st_size, h.hexdigest())
        return h.hexdigest()

    def _quarantine(self, stage: str, key: str, why: str) -> None:
        log.warning("artifact %s/%s is not usable (%s); it will be recomputed", stage, key, why)
        stamp = time.strftime("%Y%m%d%H%M%S")
        for p in (self.meta_path(stage, key), self.payload_path(stage, key)):
            if p.exists():
                os.replace(p, p.with_name(f"{p.name}.corrupt-{stamp}"))
        self._verified.pop(self.payload_path(stage, key), None)


class CorruptArtifact(RuntimeError):
    """A stored artifact no longer matches its recorded sha256."""
