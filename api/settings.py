"""Service settings: every flag of `xdpfw serve` also comes from an XDPFW_* environment variable."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
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

    # -- fleet (issue 19, docs/fleet.md): the desired state in etcd; unset = one host --------
    etcd: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="etcd client URLs (XDPFW_ETCD=http://a:2379,http://b:2379): fleet mode",
    )
    node: str | None = Field(default=None, description="this node's name in the fleet")
    node_labels: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="this node's labels (XDPFW_NODE_LABELS=k=v,k2=v2)"
    )
    etcd_prefix: str = Field(default="/xdpfw", pattern=r"^/[A-Za-z0-9._/-]*$")
    etcd_ca: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None

    @field_validator("node", "etcd_ca", "etcd_cert", "etcd_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # XDPFW_NODE= (compose, a ConfigMap): unset

    @field_validator("etcd", mode="before")
    @classmethod
    def _split_etcd(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            urls = [u.strip() for v in value for u in str(v).split(",") if u.strip()]
            for u in urls:
                if not u.startswith(("http://", "https://")):
                    raise ValueError(f"etcd URL {u!r} must start with http:// or https://")
            return urls
        return value

    @field_validator("node_labels", mode="before")
    @classmethod
    def _split_labels(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            out: dict[str, str] = {}
            for item in (p.strip() for v in value for p in str(v).split(",")):
                if not item:
                    continue
                k, sep, v = item.partition("=")
                if not sep or not k:
                    raise ValueError(f"node label {item!r} must be KEY=VALUE")
                out[k.strip()] = v.strip()
            return out
        return value

    @field_validator("node")
    @classmethod
    def _check_node(cls, value: str | None) -> str | None:
        from xdpfw.sources import SOURCE_RE

        if value is not None and not SOURCE_RE.fullmatch(value):
            raise ValueError(f"node name {value!r}: letters a-z, digits, '.', '_', '-'")
        return value

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


def get_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus explicit overrides (CLI flags win)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]


# A token guarding a listener off loopback must not be guessable.
MIN_TOKEN_CHARS = 16
