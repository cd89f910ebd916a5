"""Find `prometheus` and `promtool` for the tests, unpacking Debian's package when needed.

No PyPI package ships the Prometheus binaries, so the order is: PROMETHEUS_BIN_DIR, PATH, a
cache under .venv, then `apt-get download prometheus` + `dpkg-deb -x` into that cache — neither
needs root (as root, a missing package list is fetched first with `apt-get update`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".venv" / "tools" / "prometheus"


class Unavailable(RuntimeError):
    """No Prometheus binaries could be found or installed; the message says why."""


@lru_cache(maxsize=1)
def prometheus_bin_dir() -> Path:
    """The directory holding both binaries, or Unavailable."""
    override = os.environ.get("PROMETHEUS_BIN_DIR")
    if override:
        return Path(override)
    on_path = shutil.which("promtool")
    if on_path and shutil.which("prometheus"):
        return Path(on_path).resolve().parent
    cached = CACHE / "usr" / "bin"
    if (cached / "promtool").exists() and (cached / "prometheus").exists():
        return cached
    _unpack_debian_package()
    return cached


def _unpack_debian_package() -> None:
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise Unavailable("no promtool on PATH and no apt-get/dpkg-deb to fetch Debian's package")
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", "-q", "prometheus"]
        result = subprocess.run(download, cwd=tmp, capture_output=True, text=True, timeout=300)
        if result.returncode != 0 and os.geteuid() == 0:
            # A fresh machine may have no package lists yet.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
            result = subprocess.run(download, cwd=tmp, capture_output=True, text=True, timeout=300)
        debs = list(Path(tmp).glob("prometheus_*.deb"))
        if result.returncode != 0 or not debs:
            raise Unavailable(
                "Debian's prometheus package could not be downloaded: "
                + (result.stderr.strip().splitlines() or ["no .deb"])[-1]
            )
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=CACHE.parent))
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True, timeout=300)
    if CACHE.exists():  # another test session unpacked it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(CACHE)


def tool(name: str) -> str:
    return str(prometheus_bin_dir() / name)
