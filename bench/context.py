"""What every scenario is handed: the servers and API of one benchmark run, and its size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from detector.settings import Settings


@dataclass
class Context:
    settings: Settings
    api_url: str
    api_port: int
    api_pid: int
    redis_url: str
    conninfo: str
    data_dir: Path
    quick: bool
