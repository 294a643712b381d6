"""Who is calling: the admin token, the read-only token, or a peer on the local socket.

- the admin token (`XDPFW_TOKEN` or `<state-dir>/token`) may do everything;
- the read token (`XDPFW_READ_TOKEN` or `<state-dir>/read-token`) may read (GET/HEAD, /metrics)
  and is refused every change with 403 (`error: ReadOnlyToken`);
- a process connected to the unix socket (`--listen unix:PATH`, mode 0660, group `xdpfw`) needs
  no token: the file permissions are the check. Its uid (SO_PEERCRED) is the `who` of the
  audit line; api/localsock.py puts it into the ASGI scope as PEER_UID.

`authorize` is called before a write's body is read (api/limits.py) and by the read
dependency (api/deps.py); both record the caller in the scope (WHO) for the audit log.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from starlette.types import Scope

__all__ = [
    "MISSING_TOKEN",
    "PEER_UID",
    "READ_ONLY",
    "WHO",
    "WRONG_TOKEN",
    "Refusal",
    "Tokens",
    "authorize",
    "who_of",
]

PEER_UID = "xdpfw.peer_uid"  # scope key: the uid of a unix-socket peer
WHO = "xdpfw.who"  # scope key: "admin", "read", "uid:N" (or "wrong-token", refused)

MISSING_TOKEN = (
    "missing bearer token: send `Authorization: Bearer <token>` (the token is in "
    "<state-dir>/token, or XDPFW_TOKEN)"
)
WRONG_TOKEN = "wrong token"
READ_ONLY = (
    "the read-only token cannot change anything; use the admin token (<state-dir>/token or "
    "XDPFW_TOKEN), or the local socket as a member of its group"
)


@dataclass(frozen=True)
class Tokens:
    admin: str
    read: str | None = None


@dataclass(frozen=True)
class Refusal:
    status: int  # 401 or 403
    error: str  # MissingToken, WrongToken, ReadOnlyToken
    detail: str


def _matches(credentials: str, expected: str | None) -> bool:
    return expected is not None and secrets.compare_digest(
        credentials.encode(), expected.encode()
    )


def authorize(
    scope: Scope, authorization: str | None, tokens: Tokens, *, write: bool
) -> Refusal | str:
    """The caller's role ("admin", "read", "uid:N") recorded in scope[WHO], or why not."""
    uid = scope.get(PEER_UID)
    if uid is not None:
        who = f"uid:{uid}"
    else:
        scheme, _, credentials = (authorization or "").partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            return Refusal(401, "MissingToken", MISSING_TOKEN)
        if _matches(credentials, tokens.admin):
            who = "admin"
        elif _matches(credentials, tokens.read):
            if write:
                scope[WHO] = "read"  # named in the audit line of the refusal
                return Refusal(403, "ReadOnlyToken", READ_ONLY)
            who = "read"
        else:
            scope[WHO] = "wrong-token"
            return Refusal(403, "WrongToken", WRONG_TOKEN)
    scope[WHO] = who
    return who


def who_of(scope: Scope) -> str:
    """The recorded caller, or "anonymous" (a read on a loopback-only listener)."""
    who = scope.get(WHO)
    if who is None and scope.get(PEER_UID) is not None:
        return f"uid:{scope[PEER_UID]}"
    return str(who) if who is not None else "anonymous"
