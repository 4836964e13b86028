"""The local state a `pai` process keeps under PAI_HOME, made safe against kills and races.

- The MLflow SQLite database is created once, under a file lock, in a temporary file that is
  renamed into place when complete: a kill during creation, or two first runs at once, can
  no longer leave a half-made schema. A database left half-made by an older version (no runs
  in it) is set aside and recreated; one that holds runs but is unreadable is never touched:
  the error says what to do.
- Prefect's temporary server (no `pai server`) is started so that it exits when the process
  that started it dies, even by SIGKILL: it watches its parent.
"""
from __future__ import annotations

import fcntl
import importlib.abc
import importlib.machinery
import logging
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("flows.local_state")


class TrackingStoreError(RuntimeError):
    """The tracking database cannot be used; the message is one line that says why and what to do."""


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _latest_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _state(db: Path) -> tuple[str, int]:
    """("ok" | "incomplete" | "unreadable", number of runs it holds)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            runs = con.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0
            rev = con.execute("select version_num from alembic_version").fetchall() \
                if "alembic_version" in tables else []
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return "unreadable", 0
    return ("ok" if rev == [(_latest_revision(),)] else "incomplete"), runs


def ensure_mlflow_db(db: Path, artifact_root: Path) -> None:
    """Make `db` a complete MLflow database, or say in one line why it cannot be."""
    if db.exists() and _state(db)[0] == "ok":  # the common case, no lock needed
        return
    with file_lock(db.with_name(db.name + ".lock")):
        if db.exists():
            state, runs = _state(db)
            if state == "ok":
                return  # another process made it while we waited
            if runs:
                raise TrackingStoreError(
                    f"{db}: MLflow database with {runs} runs does not match MLflow {_mlflow_version()}'s "
                    f"schema {_latest_revision()} ({state}); run `mlflow db upgrade sqlite:///{db}` "
                    "or move it aside")
            aside = db.with_name(f"{db.name}.{state}-{time.strftime('%Y%m%d%H%M%S')}")
            os.replace(db, aside)
            log.warning("%s was %s and held no runs (a creation interrupted by a kill?): moved to %s, "
                        "recreating", db, state, aside)
        tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(f"sqlite:///{tmp}", str(artifact_root)).engine.dispose()
        os.replace(tmp, db)


def _mlflow_version() -> str:
    import mlflow

    return mlflow.__version__


# ---------------------------------------------------------------- Prefect's temporary server

_WATCHER = "flows.local_state:create_watched_app"


def create_watched_app():  # noqa: ANN201 - uvicorn's factory returns Prefect's ASGI app
    """Prefect's server app, plus a thread that ends this server when its parent process is
    gone (the parent's pid is no longer ours: it died and we were re-parented)."""
    import threading

    from prefect.server.api.server import create_app

    parent = os.getppid()
    url = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL", "")
    if url.startswith("sqlite+aiosqlite:///"):  # its folder (PAI_HOME) may not exist yet
        Path(url.removeprefix("sqlite+aiosqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="pai-parent-watch", daemon=True).start()
    return create_app()


def tie_temporary_server_to_its_parent() -> None:
    """Start Prefect's temporary server through `create_watched_app`: SIGKILL of a `pai` process
    left it running (231 MB, listening) before. Importing Prefect's server module costs ~5 s, so
    the launcher is patched when Prefect itself imports it (only if it needs a temporary server)."""
    if _SERVER_MODULE in sys.modules:
        _patch(sys.modules[_SERVER_MODULE])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


_SERVER_MODULE = "prefect.server.api.server"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname != _SERVER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:  # noqa: ANN001
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _patch(prefect_server) -> None:  # noqa: ANN001
    cls = getattr(prefect_server, "SubprocessASGIServer", None)
    if cls is None or getattr(cls, "_pai_watched", False):
        return

    def run_watched(self) -> subprocess.Popen:  # noqa: ANN001
        from prefect.settings import get_current_settings

        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}
        return subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", _WATCHER, "--host", "127.0.0.1",
                                 "--port", str(self.port), "--log-level", "error", "--lifespan", "on"], env=env)

    cls._run_uvicorn_command = run_watched
    cls._pai_watched = True
