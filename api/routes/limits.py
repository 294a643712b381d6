"""/v1/limits: the sources that rate-limit rules have banned (issue 16), and lifting bans.

A ban lives in the kernel (xdpfw_bans, LRU): a (rule, source) pair that went over its rule's
budget with `ban_seconds` set is dropped outright until the ban ends. These routes read and
lift them; nothing here is stored in the database (a ban outlives no restart of the kernel
maps, and ends by itself).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AUTH_RESPONSES, ERROR_RESPONSES, ReadAccess, ServiceDep, WriteAccess
from api.models import BanOut, BansOut, UnbanOut
from xdpfw.errors import InvalidRule
from xdpfw.rules import MAX_RULE_ID

__all__ = ["router"]

router = APIRouter(
    prefix="/v1/limits", tags=["limits"], responses={**AUTH_RESPONSES, **ERROR_RESPONSES}
)


@router.get("/banned", response_model=BansOut, dependencies=[ReadAccess])
def banned(svc: ServiceDep) -> BansOut:
    """The (rule, source) pairs dropped outright now, with the seconds left on each ban."""
    return BansOut(bans=[BanOut.of(b) for b in svc.bans()])


@router.delete("/banned", response_model=UnbanOut, dependencies=[WriteAccess])
def unban(
    svc: ServiceDep,
    source: Annotated[str | None, Query(max_length=64, description="one address")] = None,
    rule: Annotated[int | None, Query(ge=1, le=MAX_RULE_ID, description="one rule id")] = None,
) -> UnbanOut:
    """Lift bans: of a source, of a rule, both, or (neither given) every ban. The source's
    budget starts full again."""
    if source is not None:
        try:
            source = str(ipaddress.ip_address(source.strip()))
        except ValueError as exc:
            raise InvalidRule("source", f"{source!r} is not an IPv4/IPv6 address") from exc
    return UnbanOut(unbanned=svc.unban(source, rule))
