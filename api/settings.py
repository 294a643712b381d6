"""Service settings: from `xdpfw serve` flags, XDPFW_* environment variables and a TOML file.

Precedence, highest first: flags, the environment, the config file, the defaults. The file is
`--config FILE`, else `XDPFW_CONFIG`, else /etc/xdpfw/xdpfw.toml when it exists; its keys are
the field names below (`max_rules = 65536`); an unknown key, a wrong value or bad TOML stops
the start with a message naming the file and the key. docs/configuration.md lists every key
(tests/test_ops_config.py checks it against this model).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = [
    "DEFAULT_CONFIG",
    "MIN_TOKEN_CHARS",
    "ConfigError",
    "Settings",
    "config_path",
    "get_settings",
]

DEFAULT_CONFIG = Path("/etc/xdpfw/xdpfw.toml")
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("xdpfw_config_file", default=None)


class ConfigError(ValueError):
    """A setting is wrong; the message names the key and where it came from."""


class Settings(BaseSettings):
    """Configuration of one xdpfw instance (one bpffs dir, one state dir, one listener)."""

    model_config = SettingsConfigDict(env_prefix="XDPFW_", extra="ignore")

    iface: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="interfaces to attach to (XDPFW_IFACE=eth1,eth2)"
    )
    xdp_mode: Literal["auto", "native", "generic"] = Field(
        default="auto", description="how to attach: native (driver), generic (skb), or auto"
    )
    listen: str = Field(
        default="127.0.0.1:8000",
        description="HOST:PORT of the TCP listener; a `unix:PATH` entry (XDPFW_LISTEN="
        "127.0.0.1:8000,unix:/run/xdpfw/api.sock) sets `socket`",
    )
    socket: Path | None = Field(
        default=None,
        description="a unix socket to serve the API on as well (mode 0660, group "
        "`socket_group`): its peers need no token",
    )
    socket_group: str = Field(
        default="xdpfw", description="the group that owns the socket (its members may use it)"
    )
    state_dir: Path = Field(
        default=Path("/var/lib/xdpfw"), description="database and tokens (mode 0700)"
    )
    bpffs_dir: Path = Field(
        default=Path("/sys/fs/bpf/xdpfw"), description="where the program and maps are pinned"
    )
    token: str | None = Field(
        default=None, repr=False, description="the admin token (else <state_dir>/token)"
    )
    read_token: str | None = Field(
        default=None,
        repr=False,
        description="the read-only token: GET and /metrics only (else <state_dir>/read-token, "
        "generated at first start)",
    )
    max_rules: int = Field(default=1_048_576, ge=1, le=1 << 26, description="rule capacity")
    max_prefixes: int = Field(
        default=262_144, ge=1, le=1 << 26, description="capacity of each prefix trie"
    )
    max_sets: int = Field(
        default=16_384, ge=2, le=1 << 26, description="distinct port/protocol rule sets"
    )
    max_tbl8_groups: int = Field(
        default=16_384, ge=1, le=1 << 20,
        description="IPv4 /24s holding prefixes longer than /24, per direction (1 KiB each)",
    )
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
    # X-ray (issue 17): the kernel's cap on sampled frames, and the bytes kept of each
    sample_max_pps: int = Field(
        default=2000, ge=1, le=10_000_000,
        description="samples per second over all rules and CPUs (a kernel token bucket)",
    )
    sample_snaplen: int = Field(
        default=128, ge=1, le=2048, description="bytes kept of each sampled frame"
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

    # -- logging (api/logs.py) and the audit log (api/audit.py) ---------------------------
    log_format: Literal["text", "json"] = Field(
        default="text", description="text lines, or one JSON object per line"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="the lowest level logged"
    )
    access_log: bool = Field(
        default=False,
        description="uvicorn's line per request (the audit log already has one per change)",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_FILE.get()
        if path is None:
            return init_settings, env_settings
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, path)

    @model_validator(mode="before")
    @classmethod
    def _unix_listen(cls, data: Any) -> Any:
        """`listen` entries `unix:PATH` name the socket; the other one is the TCP listener."""
        if not isinstance(data, dict) or "listen" not in data:
            return data
        value = data["listen"]
        entries = value.split(",") if isinstance(value, str) else value
        if not isinstance(entries, list):
            return data
        tcp = [str(v).strip() for v in entries if not str(v).strip().startswith("unix:")]
        unix = [str(v).strip()[5:] for v in entries if str(v).strip().startswith("unix:")]
        out = dict(data)
        if len(tcp) > 1 or len(unix) > 1:
            raise ValueError("listen takes one HOST:PORT and at most one unix:PATH")
        if tcp:
            out["listen"] = tcp[0]
        else:
            del out["listen"]
        if unix:
            out["socket"] = unix[0]
        return out

    # -- fleet (issue 19, docs/fleet.md): the desired state in etcd; unset = one host --------
    etcd: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="etcd client URLs (XDPFW_ETCD=http://a:2379,http://b:2379): fleet mode",
    )
    node: str | None = Field(default=None, description="this node's name in the fleet")
    node_labels: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="this node's labels (XDPFW_NODE_LABELS=k=v,k2=v2)"
    )
    etcd_prefix: str = Field(
        default="/xdpfw", pattern=r"^/[A-Za-z0-9._/-]*$",
        description="etcd key prefix: the nodes sharing it are one fleet",
    )
    etcd_ca: Path | None = Field(default=None, description="CA file that signed etcd's certs")
    etcd_cert: Path | None = Field(default=None, description="client certificate for etcd")
    etcd_key: Path | None = Field(default=None, description="the client certificate's key")

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
    def read_token_file(self) -> Path:
        return self.state_dir / "read-token"

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


def config_path(explicit: Path | None = None) -> Path | None:
    """--config FILE, else XDPFW_CONFIG, else /etc/xdpfw/xdpfw.toml when it exists."""
    if explicit is not None:
        return explicit
    if os.environ.get("XDPFW_CONFIG"):
        return Path(os.environ["XDPFW_CONFIG"])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _where(key: str) -> str:
    return f"{key} (flag --{key.replace('_', '-')} or XDPFW_{key.upper()})"


def _check_file(path: Path) -> None:
    """The file alone: readable TOML, known keys, valid values (else ConfigError naming them)."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (--config / XDPFW_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = set(Settings.model_fields)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key {unknown[0]!r}"
            + (f" (and {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else "")
            + "; the keys are listed in docs/configuration.md (names like max_rules, not "
            "XDPFW_MAX_RULES or max-rules)"
        )
    try:
        Settings.model_validate(data)  # the file's values only: no environment, no flags
    except ValidationError as exc:
        raise ConfigError(_describe(exc, f"config file {path}: ", lambda k: k)) from None


def _describe(exc: ValidationError, prefix: str, name: Any) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(map(str, err["loc"])) or "settings"
        lines.append(f"{prefix}{name(key) if err['loc'] else key}: {err['msg']}")
    return "\n".join(lines)


def get_settings(config: Path | None = None, **overrides: object) -> Settings:
    """Settings from flags (`overrides`; None means not given) > environment > the config
    file (config_path(config)) > defaults. Raises ConfigError naming the key and its source."""
    path = config_path(config)
    if path is not None:
        _check_file(path)
    token = _CONFIG_FILE.set(path)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(_describe(exc, "", _where)) from None
    finally:
        _CONFIG_FILE.reset(token)


# A token guarding a listener off loopback must not be guessable.
MIN_TOKEN_CHARS = 16
