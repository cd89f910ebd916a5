"""Series ids and model versions: validation and parsing, shared by REST and the streams."""

from __future__ import annotations

import re

from detector.errors import InvalidSeriesError, InvalidVersionError

SERIES_ID_RULE = (
    "series_id must be 1-128 characters of ASCII letters, digits, '_', '.', ':' and '-', "
    "and not '.' or '..'"
)
_SERIES_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_VERSION = re.compile(r"v?([0-9]+)(?:\.([0-9]+)\.([0-9]+))?")

VERSION_RULE = "version must look like v3.0.0, v3 or 3, with a major version of 1 or more"

# The same rules as JSON Schema, for OpenAPI (the checks above stay the ones that run, so a
# 422 states the rule in words). Patterns are anchored with ^…$ as ECMA-262 regexes.
SERIES_ID_SCHEMA: dict[str, object] = {
    "pattern": r"^(?!\.\.?$)[A-Za-z0-9_.:\-]{1,128}$",
    "minLength": 1,
    "maxLength": 128,
}
# Empty (the latest) or a version whose major number is 1 or more.
VERSION_SCHEMA: dict[str, object] = {
    "pattern": r"^(v?0*[1-9][0-9]*(\.[0-9]+\.[0-9]+)?)?$",
    "maxLength": 32,
}


def validate_series_id(series_id: str) -> str:
    """Return ``series_id`` unchanged, or raise InvalidSeriesError stating the rule."""
    if (
        not isinstance(series_id, str)
        or _SERIES_ID.fullmatch(series_id) is None
        or series_id in (".", "..")
    ):
        raise InvalidSeriesError(SERIES_ID_RULE)
    return series_id


def parse_version(text: str | int) -> tuple[int, int, int]:
    """Parse ``v3.0.0``, ``v3`` or ``3`` into (major, minor, patch).

    Only ``X.0.0`` versions are ever created, but ``v3.1.0`` is well-formed: it parses, and
    the store answers that it does not exist (404) rather than that it is malformed (422).
    """
    match = _VERSION.fullmatch(str(text))
    if match is None or len(str(text)) > 32:
        raise InvalidVersionError(VERSION_RULE)
    major = int(match.group(1))
    minor = int(match.group(2) or 0)
    patch = int(match.group(3) or 0)
    if major < 1:
        raise InvalidVersionError(VERSION_RULE)
    return major, minor, patch


def format_version(major: int) -> str:
    """The public name of a stored version number: 3 → ``v3.0.0``."""
    return f"v{major}.0.0"
