"""Rule sources: the named lists a rule belongs to.

A source is a short name (`SOURCE_RE`): `api` for rules made by hand (`DEFAULT_SOURCE`), or
whatever a caller names (`firehol_level1`, `crowdsec`, `fail2ban.sshd`). One kernel rule (one
match + action + mode) may be held by several sources; it leaves the kernel when its last
holder lets it go (a replace, a delete, that holding's TTL). The semantics live in
api/service.py (holdings in api/store.py); this module is the name's one definition, shared by
the API, the CLI and the integrations.
"""

from __future__ import annotations

import re

from xdpfw.errors import InvalidRule

__all__ = ["DEFAULT_SOURCE", "SOURCE_PATTERN", "SOURCE_RE", "check_source"]

DEFAULT_SOURCE = "api"
SOURCE_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
SOURCE_RE = re.compile(SOURCE_PATTERN)


def check_source(name: str) -> str:
    """The name, if it is a valid source name; InvalidRule (field "source") otherwise."""
    if not isinstance(name, str) or SOURCE_RE.fullmatch(name) is None:
        shown = repr(name)[:80]
        raise InvalidRule(
            "source",
            f"{shown} is not a source name: 1-64 characters, lower-case letters, digits, "
            "'.', '_' and '-', starting with a letter or digit (e.g. firehol_level1)",
        )
    return name
