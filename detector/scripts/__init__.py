"""The service's Lua scripts, one ``.lua`` file each with its KEYS/ARGV contract in a header."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def lua(name: str) -> str:
    """The source of ``<name>.lua`` (read once per process)."""
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
