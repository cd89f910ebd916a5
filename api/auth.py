"""Optional API keys: write keys may fit, read keys may only read; compared in constant time."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from detector.errors import AnomalyError
from detector.settings import Settings, api_key_list


class UnauthorizedError(AnomalyError):
    """No key, or a key that is not configured (HTTP 401)."""


class ForbiddenError(AnomalyError):
    """A valid read-only key used for a write (HTTP 403)."""


_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")
_bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token.")


def _keys(csv: str) -> list[bytes]:
    return [key.encode() for key in api_key_list(csv)]


def _matches(candidate: bytes, keys: list[bytes]) -> bool:
    # Compare against every key, without stopping at the first match, so timing reveals nothing.
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key)
    return found


def _access(
    request: Request, header_key: str | None, bearer: HTTPAuthorizationCredentials | None
) -> str:
    """'write', 'read' or 'open' (no keys configured)."""
    settings: Settings = request.app.state.services.settings
    write_keys, read_keys = _keys(settings.api_keys), _keys(settings.api_read_keys)
    if not write_keys and not read_keys:
        return "open"
    presented = header_key or (bearer.credentials if bearer else None)
    if not presented:
        raise UnauthorizedError("an API key is required (X-API-Key header or Bearer token)")
    candidate = presented.encode()
    if _matches(candidate, write_keys):
        return "write"
    if _matches(candidate, read_keys):
        return "read"
    raise UnauthorizedError("the API key is not valid")


HeaderKey = Annotated[str | None, Security(_header)]
BearerKey = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


async def require_read(request: Request, header_key: HeaderKey, bearer: BearerKey) -> None:
    _access(request, header_key, bearer)


async def require_write(request: Request, header_key: HeaderKey, bearer: BearerKey) -> None:
    if _access(request, header_key, bearer) == "read":
        raise ForbiddenError("this API key may only read; fitting needs a write key")


ReadAccess = Depends(require_read)
WriteAccess = Depends(require_write)
