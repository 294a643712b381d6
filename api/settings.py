"""Service settings: every flag of `xdpfw serve` also comes from an XDPFW_* environment variable."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["MIN_TOKEN_CHARS", "Settings", "get_settings"]


class Settings(BaseSettings):
    """Configuration of one xdpfw instance (one bpffs dir, one state dir, one listener)."""

    model_config = SettingsConfigDict(env_prefix="XDPFW_", extra="ignore")

    iface: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="interfaces to attach to (XDPFW_IFACE=eth1,eth2)"
    )
    xdp_mode: Literal["auto", "native", "generic"] = "auto"
    listen: str = "127.0.0.1:8000"
    state_dir: Path = Path("/var/lib/xdpfw")
    bpffs_dir: Path = Path("/sys/fs/bpf/xdpfw")
    token: str | None = Field(default=None, repr=False)
    max_rules: int = Field(default=1_048_576, ge=1, le=1 << 26)
    max_prefixes: int = Field(default=262_144, ge=1, le=1 << 26)
    max_sets: int = Field(default=16_384, ge=2, le=1 << 26)
    protect: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="source prefixes that can never be dropped (XDPFW_PROTECT=a,b)",
    )
    ttl_interval: float = Field(default=0.5, gt=0, le=60, description="TTL sweep period, s")
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="largest body of a single-rule or other small write"
    )
    max_bulk_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="largest text/plain bulk body"
    )
    max_bulk_json_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="largest JSON bulk body (JSON costs ~50x its size to parse: send big lists "
        "as text/plain)",
    )
    # Connections (docs/guarantees.md, "Connections and file descriptors").
    limit_concurrency: int | None = Field(
        default=None,
        ge=8,
        description="most open connections (and requests in flight); beyond it the connection "
        "waiting longest for a request is closed. Default: what fits under the open-file "
        "limit, at most 4096",
    )
    header_timeout: float = Field(
        default=10.0, gt=0, le=300, description="s a connection may take to send a request head"
    )
    keep_alive_timeout: float = Field(
        default=5.0, gt=0, le=300, description="s an idle keep-alive connection stays open"
    )
    protect_api: bool = Field(
        default=True,
        description="allow TCP to the listen address and port above every drop rule, so no "
        "rule cuts the API off (XDPFW_PROTECT_API=false turns it off)",
    )
    # -- /metrics (api/metrics.py) --
    metrics_top_rules: int = Field(
        default=100,
        ge=0,
        le=1 << 26,
        description="per-rule series on /metrics for the N busiest rules only (0: none); one "
        "series per rule and counter at a million rules is not scrapeable",
    )

    # -- CrowdSec bouncer (api/crowdsec.py; off unless crowdsec_lapi is set) ----------------
    crowdsec_lapi: str | None = Field(
        default=None, description="CrowdSec Local API URL to pull ban decisions from"
    )
    crowdsec_key_file: Path | None = Field(
        default=None, description="file holding the bouncer key (cscli bouncers add NAME -o raw)"
    )
    crowdsec_interval: float = Field(
        default=10.0, ge=0.1, le=3600, description="s between polls (or a duration: 10s, 1m)"
    )
    crowdsec_resync: float = Field(
        default=600.0, ge=1, le=86400,
        description="s between full pulls that replace source crowdsec (or a duration: 10m)",
    )  # fmt: skip

    @field_validator("crowdsec_interval", "crowdsec_resync", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        from xdpfw.crowdsec import parse_go_duration

        if isinstance(value, str) and value.strip() and not _is_number(value):
            return parse_go_duration(value)
        return value

    @field_validator("crowdsec_lapi")
    @classmethod
    def _check_lapi(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from urllib.parse import urlsplit

        url = value.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{value!r} is not a LAPI URL: give http(s)://HOST:PORT, e.g. "
                "http://127.0.0.1:8080"
            )
        return url

    @model_validator(mode="after")
    def _crowdsec_pair(self) -> Settings:
        if (self.crowdsec_lapi is None) != (self.crowdsec_key_file is None):
            given, missing = (
                ("--crowdsec-lapi", "--crowdsec-key-file (XDPFW_CROWDSEC_KEY_FILE)")
                if self.crowdsec_lapi is not None
                else ("--crowdsec-key-file", "--crowdsec-lapi (XDPFW_CROWDSEC_LAPI)")
            )
            raise ValueError(f"{given} needs {missing} too")
        return self

    @field_validator("iface", "protect", mode="before")
    @classmethod
    def _split_ifaces(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("protect")
    @classmethod
    def _check_protect(cls, value: list[str]) -> list[str]:
        from xdpfw.errors import InvalidRule
        from xdpfw.rules import parse_network

        try:
            return [parse_network(v, "protect").with_prefixlen for v in value]
        except InvalidRule as exc:
            raise ValueError(exc.problem) from exc

    @field_validator("iface")
    @classmethod
    def _check_iface(cls, value: list[str]) -> list[str]:
        if "lo" in value:
            raise ValueError(
                "xdpfw never filters the loopback interface (lo): a drop rule there would cut "
                "the API and every local connection of this host; name the interfaces "
                "traffic arrives on"
            )
        return value

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, port = split_listen(value)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def loopback_only(self) -> bool:
        host = self.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def token_file(self) -> Path:
        return self.state_dir / "token"

    @property
    def db_file(self) -> Path:
        return self.state_dir / "rules.sqlite3"


def split_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:8000', '[::1]:8000' or ':8000' -> (host, port)."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen address {value!r} must be HOST:PORT (e.g. 127.0.0.1:8000)")
    return host or "0.0.0.0", int(port)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def get_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus explicit overrides (CLI flags win)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]


# A token guarding a listener off loopback must not be guessable.
MIN_TOKEN_CHARS = 16
