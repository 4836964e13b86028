"""Content-addressed artifact store: `<root>/<stage>/<key>.pt` (torch.save payload) beside
`<key>.json` (sha256, size, provenance, info), written last, atomically. Nothing read back is trusted
blindly: the JSON is sealed (`meta_sha256` over the rest), must name this stage and key, and the
payload must match its sha256; else the artifact is set aside (`*.corrupt-<stamp>`; left on a
read-only store) and reported absent, so it is recomputed. Checkpoints: `<key>.ckpt.pt` + `.sha256`.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, SerializeAsAny, model_validator

from pai_core.infos import Info

log = logging.getLogger("pai_core.store")

META_FORMAT = 2  # format 1 (no "format" field) was written before the metadata was sealed
STALE_TEMP_SECONDS = 24 * 3600  # a temp file not tied to a local writer is dead after this
_PIDNS = os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else ""  # "pid:[inode]"
_HOST = re.sub(r"[^A-Za-z0-9]+", "-", f"{socket.gethostname()} {_PIDNS}").strip("-")[:80]  # where a pid means this pid
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*)\.[^.]+\.tmp$")


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


class StoreError(RuntimeError):
    """A store operation that cannot be done; its message is one line, fit for the CLI."""


class CorruptArtifact(StoreError):
    """A stored artifact no longer matches its recorded sha256."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """A refused write (read-only store) becomes a one-line StoreError; other errors pass."""
    try:
        yield
    except OSError as e:
        if isinstance(e, PermissionError) or e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise StoreError(f"{path}: store is read-only ({type(e).__name__}); use a writable PAI_HOME") from e
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see old or new, never half.
    The temp file is `.<name>.<pid>@<host>.<rand>.tmp`, so a killed writer's can be found."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}@{_HOST}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0) if os.name == "posix" else None  # signal 0 probes; on Windows it would not
    except ProcessLookupError:
        return False
    except OSError:
        pass  # EPERM: it exists, owned by someone else
    return True


def sweep_temps(folder: Path) -> None:
    """Remove temp files of killed writers in `folder`: this host's when their pid is dead, other
    hosts' and pre-pid ones by age. A live writer's file is never touched. Never raises."""
    try:
        names = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    except OSError:
        return
    for p in names:
        m = _TEMP.match(p.name)
        with suppress(OSError):  # gone already, or a read-only store: leave it
            if not p.is_dir() and (not _alive(int(m["pid"])) if m and m["host"] == _HOST
                                   else time.time() - p.lstat().st_mtime > STALE_TEMP_SECONDS):
                p.unlink()
                log.info("removed %s: its writer is gone", p)


def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def set_aside(path: Path) -> bool:
    """Rename a file or folder to `<name>.corrupt-<stamp>[-n]`; False when it cannot be moved
    (read-only store) or is gone. Never raises."""
    name = f"{path.name}.corrupt-{time.strftime('%Y%m%d%H%M%S')}"
    n = next(n for n in range(10**6) if not os.path.lexists(path.with_name(f"{name}-{n}" if n else name)))
    try:
        os.replace(path, path.with_name(f"{name}-{n}" if n else name))
        return True
    except OSError as e:
        if not isinstance(e, FileNotFoundError):
            log.warning("%s cannot be set aside (%s: %s)", path, type(e).__name__, e.strerror or e)
        return False


def save_checkpoint(path: Path, state: Any) -> None:
    """Sidecar removed, checkpoint written atomically, then its sha256: a crash in between leaves
    a checkpoint without a sidecar, checked by loading it (a mismatch always means damage)."""
    data, sidecar = to_bytes(state), Path(f"{path}.sha256")
    with writing(path):
        sidecar.unlink(missing_ok=True)
        atomic_write(path, data)
        atomic_write(sidecar, hashlib.sha256(data).hexdigest().encode())


def load_checkpoint(path: Path, map_location: Any = "cpu", apply: Callable[[Any], Any] = lambda x: x) -> Any | None:
    """`apply(contents)`, or None when there is no checkpoint or it is unusable: a bad one (truncated,
    flipped bytes, a folder, or `apply` raises: not this run's) is set aside with a warning."""
    sidecar = Path(f"{path}.sha256")
    try:
        data = path.read_bytes()
        want = sidecar.read_text().strip() if os.path.lexists(sidecar) else None  # None: v1, or died before it
        if want is None or want == hashlib.sha256(data).hexdigest():
            return apply(torch.load(io.BytesIO(data), weights_only=True, map_location=map_location))
        why = "sha256 mismatch"
    except FileNotFoundError:
        return None
    except Exception as e:  # torch raises many kinds on a bad archive; none may end the run
        why = f"{type(e).__name__}: {str(e)[:200]}"
    log.warning("checkpoint %s is not usable (%s); training restarts from the beginning", path, why)
    for p in (path, sidecar):
        set_aside(p)
    return None


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """Unsealed `meta` as JSON reads it back, plus `format` and `meta_sha256` over all the rest."""
    body = json.loads(json.dumps({**meta, "format": META_FORMAT}, default=str))
    return {**body, "meta_sha256": _digest(body)}


def meta_problem(stage: str, key: str, meta: Any) -> str | None:
    """Why this parsed metadata cannot be trusted as stage/key's, or None."""
    if not isinstance(meta, dict):
        return f"metadata is a JSON {type(meta).__name__}, not an object"
    if ("meta_sha256" in meta or "format" in meta) and \
            meta.get("meta_sha256") != _digest({k: v for k, v in meta.items() if k != "meta_sha256"}):
        return "metadata hash mismatch (edited after it was written?)"
    if meta.get("stage") != stage or meta.get("key") != key:
        return f"metadata names {meta.get('stage')!r}/{meta.get('key')!r}, not this artifact"
    sha, info, size = meta.get("sha256"), meta.get("info", {}), meta.get("size", 0)
    ok = isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) and isinstance(info, dict) and type(size) is int
    return None if ok else "metadata fields have the wrong types"


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._verified: dict[Path, tuple[int, int, str]] = {}  # path -> (mtime_ns, size, sha)
        self._swept: set[str] = set()  # stage folders already cleared of dead writers' temp files

    def payload_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.pt"

    def meta_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.json"

    def checkpoint_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.ckpt.pt"

    def _sweep(self, stage: str) -> None:
        if stage not in self._swept:
            self._swept.add(stage)
            sweep_temps(self.root / stage)

    # ------------------------------------------------------------------ write
    def check_writable(self, stage: str) -> None:
        """Raise StoreError now if `stage`'s folder cannot be written, before any compute."""
        with writing(folder := self.root / stage):
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder, prefix=f".probe.{os.getpid()}@{_HOST}.", suffix=".tmp").close()

    def put(self, stage: str, key: str, payload: Any, info: Info | dict[str, Any] | None = None,
            provenance: dict[str, Any] | None = None) -> Ref:
        self._sweep(stage)
        data = to_bytes(payload)
        sha = hashlib.sha256(data).hexdigest()
        path, meta_path = self.payload_path(stage, key), self.meta_path(stage, key)
        meta = seal({
            "stage": stage, "key": key, "sha256": sha, "size": len(data),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "info": info.model_dump(mode="json") if isinstance(info, BaseModel) else dict(info or {}),
            "provenance": provenance or {},
        })
        with writing(path):
            for p in (path, meta_path):
                if p.is_dir():  # would block the rename: moved aside, never deleted
                    set_aside(p)
            atomic_write(path, data)
            atomic_write(meta_path, json.dumps(meta, indent=1).encode())
        with suppress(OSError):  # the stage is done; a checkpoint that cannot go is harmless
            for p in (ckpt := self.checkpoint_path(stage, key), Path(f"{ckpt}.sha256")):
                p.unlink(missing_ok=True)
        return Ref(stage=stage, key=key, sha256=sha, info=meta["info"], computed=True)

    # ------------------------------------------------------------------- read
    def get(self, stage: str, key: str) -> Ref | None:
        """The verified artifact, or None if absent or unusable (set aside). Never raises for what a file holds."""
        self._sweep(stage)
        meta_path, path = self.meta_path(stage, key), self.payload_path(stage, key)
        try:
            meta = json.loads(meta_path.read_bytes())
            why = meta_problem(stage, key, meta)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as e:  # a folder, not UTF-8, not JSON, too deep...
            return self._quarantine(stage, key, f"unreadable metadata ({type(e).__name__})")
        if why is not None:
            return self._quarantine(stage, key, why)
        try:
            if self._sha(path) != meta["sha256"]:
                return self._quarantine(stage, key, "sha256 mismatch")
        except OSError as e:  # missing, a folder, unreadable
            return self._quarantine(stage, key, f"payload missing or unreadable ({type(e).__name__})")
        try:
            ref = Ref(stage=stage, key=key, sha256=meta["sha256"], info=meta.get("info", {}))
        except (ValueError, TypeError, RecursionError):  # ValidationError is a ValueError
            return self._quarantine(stage, key, "metadata does not match the stage's info type")
        if "meta_sha256" not in meta:  # format 1 that passed every other check: trusted once, sealed
            with suppress(OSError):  # a read-only store keeps it format 1, still checked as above
                atomic_write(meta_path, json.dumps(seal(meta), indent=1).encode())
        return ref

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
        """Set both files (or folders) aside; where that is refused, leave them. Absent either way."""
        self._verified.pop(self.payload_path(stage, key), None)
        paths = [p for p in (self.meta_path(stage, key), self.payload_path(stage, key)) if os.path.lexists(p)]
        moved = all([set_aside(p) for p in paths])
        log.warning("artifact %s/%s is not usable (%s); %s", stage, key, why, "it will be recomputed" if moved
                    else "it could not be set aside (read-only store?) and is reported absent")
