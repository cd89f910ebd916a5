"""The service's Lua scripts, one ``.lua`` file each with its KEYS/ARGV contract in a header."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Final

# Keys a script that reads many (latest pointers, model versions) takes in one call: bounded,
# since a script holds Redis while it runs.
KEYS_A_CALL: Final = 5000


@cache
def lua(name: str) -> str:
    """The source of ``<name>.lua`` (read once per process)."""
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
