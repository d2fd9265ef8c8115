"""Bearer JWTs: HS256 only, `exp` required, the tenant is the verified `sub`."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta

import jwt

from server.errors import Unauthenticated

ALGORITHM = "HS256"
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
_TTL_RE = re.compile(r"^(\d{1,6})([smhd])$")
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class TokenVerifier:
    def __init__(self, secret: str, *, cache_size: int = 4096) -> None:
        self._secret = secret
        # Verified tokens: (tenant, exp). A client sends the same token on every call, and
        # checking its signature every time was a tenth of a StartStrategy; the expiry is
        # still checked on every call. Only tokens whose signature held are kept.
        self._verified: dict[str, tuple[str, int]] = {}
        self._cache_size = cache_size

    def tenant_of(self, authorization: str | None) -> str:
        """The tenant named by a valid `Bearer <jwt>` header; Unauthenticated otherwise."""
        if not authorization:
            raise Unauthenticated("missing authorization metadata (Bearer token)")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        known = self._verified.get(token)
        if known is not None and time.time() < known[1]:
            return known[0]
        tenant, expires = self._verify(token)
        if len(self._verified) >= self._cache_size:
            self._verified.clear()  # simpler than LRU, and a full cache is rare
        self._verified[token] = (tenant, expires)
        return tenant

    def _verify(self, token: str) -> tuple[str, int]:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        tenant = claims.get("sub")
        if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
            raise Unauthenticated("token sub is not a valid tenant name")
        return tenant, int(claims["exp"])


def parse_ttl(raw: str) -> timedelta:
    """'90s', '15m', '12h', '1d' -> timedelta."""
    match = _TTL_RE.fullmatch(raw)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"ttl {raw!r} must look like 90s, 15m, 12h or 1d")
    return timedelta(seconds=int(match.group(1)) * _TTL_UNITS[match.group(2)])


def mint_token(secret: str, tenant: str, ttl: timedelta, now: datetime) -> str:
    if not _TENANT_RE.fullmatch(tenant):
        raise ValueError(f"tenant {tenant!r} must match {_TENANT_RE.pattern}")
    claims = {"sub": tenant, "iat": int(now.timestamp()), "exp": int((now + ttl).timestamp())}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
