"""The deployment files, checked offline: no Docker engine or cluster is needed.

* docker-compose.yml against the Compose Specification JSON schema (vendored by the
  check-jsonschema package), Kubernetes manifests against the Kubernetes JSON schemas (shipped
  by kubernetes-validate), the systemd unit with `systemd-analyze verify`;
* the privileges in all three are exactly xdpfw.kernel.privileges.REQUIREMENTS, nothing privileged,
  bpffs from the host, the API on loopback, every XDPFW_* name a real setting;
* the container's own command lines (ENTRYPOINT/CMD, the kernel header step, the health check)
  run here with the repository's venv in place of the image's.
"""

from __future__ import annotations

import http.server
import importlib.resources
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import jsonschema
import kubernetes_validate
import pytest
import yaml

from api.settings import Settings, split_listen
from xdpfw.kernel.privileges import REQUIREMENTS

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent
IMAGE_VENV_BIN = "/opt/xdpfw/venv/bin/"

# The documented capability list, in the spelling of compose and Kubernetes.
CAPS = {r.cap.name for r in REQUIREMENTS}
# Settings read outside api/settings.py.
EXTRA_ENV = {"XDPFW_KHEADERS_CACHE", "XDPFW_CONFIG"}  # xdpfw.kernel.kheaders; api.settings
K8S_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]


def setting_names() -> set[str]:
    return {f"XDPFW_{name.upper()}" for name in Settings.model_fields} | EXTRA_ENV


def test_documented_capabilities() -> None:
    assert {"BPF", "NET_ADMIN", "PERFMON"} == CAPS


# -- compose ---------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err} and $$."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        val = env.get(name)
        empty = val is None or (op is not None and op.startswith(":") and val == "")
        if op is not None and op.endswith("?") and empty:
            raise KeyError(f"{name}: {arg}")
        if op is not None and op.endswith("-") and empty:
            return arg
        return val or ""

    return _INTERPOLATION.sub(repl, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


@pytest.fixture(scope="module")
def service(compose: dict[str, Any]) -> dict[str, Any]:
    assert list(compose["services"]) == ["xdpfw"]
    svc: dict[str, Any] = compose["services"]["xdpfw"]
    return svc


def compose_validator() -> jsonschema.protocols.Validator:
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(ref.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: jsonschema.protocols.Validator = cls(
        schema, format_checker=jsonschema.FormatChecker()
    )
    return validator


def test_compose_file_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    validator = compose_validator()
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_compose_schema_check_is_not_vacuous(compose: dict[str, Any]) -> None:
    bad = json.loads(json.dumps(compose))
    bad["services"]["xdpfw"]["cap_add"] = "BPF"
    bad["services"]["xdpfw"]["no_such_key"] = 1
    messages = [e.message for e in compose_validator().iter_errors(bad)]
    assert any("is not of type 'array'" in m for m in messages), messages
    assert any("no_such_key" in m for m in messages), messages


def test_compose_is_not_privileged(service: dict[str, Any]) -> None:
    assert "privileged" not in service
    assert service["cap_drop"] == ["ALL"]
    assert sorted(service["cap_add"]) == sorted(CAPS), "cap_add must be the documented list"
    assert len(service["cap_add"]) == len(set(service["cap_add"]))
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["read_only"] is True
    assert "pid" not in service and "ipc" not in service and "devices" not in service


def test_compose_capabilities_each_have_a_comment() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for cap in CAPS:
        assert re.search(rf"^\s*- {cap} # \S", text, re.M), f"cap_add {cap} has no comment why"


def test_compose_uses_host_network_and_host_bpffs(service: dict[str, Any]) -> None:
    assert service["network_mode"] == "host"
    mounts = [v if isinstance(v, dict) else _short_volume(v) for v in service["volumes"]]
    bpffs = [m for m in mounts if m["target"] == "/sys/fs/bpf"]
    assert bpffs == [{"type": "bind", "source": "/sys/fs/bpf", "target": "/sys/fs/bpf"}]
    tmp = [t for t in service["tmpfs"] if t.split(":")[0] == "/tmp"]
    assert tmp, "bcc needs a writable /tmp on the read-only root file system"


def _short_volume(spec: str) -> dict[str, str]:
    source, target = spec.split(":")[:2]
    kind = "bind" if source.startswith(("/", ".")) else "volume"
    return {"type": kind, "source": source, "target": target}


def test_compose_state_dir_is_a_volume(compose: dict[str, Any], service: dict[str, Any]) -> None:
    state = service["environment"]["XDPFW_STATE_DIR"]
    mounts = [v if isinstance(v, dict) else _short_volume(v) for v in service["volumes"]]
    (vol,) = [m for m in mounts if m["target"] == state]
    assert vol["type"] == "volume"
    assert vol["source"] in compose["volumes"]


def test_compose_environment_drives_the_settings(
    service: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = service["environment"]
    assert set(env) <= setting_names(), set(env) - setting_names()
    # The interface must come from the caller's environment.
    with pytest.raises(KeyError, match="XDPFW_IFACE"):
        interpolate(env["XDPFW_IFACE"], {})
    outer = {"XDPFW_IFACE": "eth1,eth2", "XDPFW_PORT": "9000", "XDPFW_XDP_MODE": "native"}
    resolved = {k: interpolate(str(v), outer) for k, v in env.items()}
    for key in list(os.environ):
        if key.startswith("XDPFW_"):
            monkeypatch.delenv(key)
    for key, value in resolved.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.iface == ["eth1", "eth2"]
    assert settings.xdp_mode == "native"
    assert (settings.host, settings.port) == ("127.0.0.1", 9000)
    assert settings.loopback_only
    assert settings.token is None or settings.token == ""  # empty: generated on first start
    assert str(settings.bpffs_dir).startswith("/sys/fs/bpf/")


def test_compose_api_defaults_to_loopback(service: dict[str, Any]) -> None:
    listen = interpolate(service["environment"]["XDPFW_LISTEN"], {"XDPFW_IFACE": "x"})
    assert split_listen(listen) == ("127.0.0.1", 8000)


# -- Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def local(argv: list[str]) -> list[str]:
    """The image's venv paths -> this repository's venv."""
    return [a.replace(IMAGE_VENV_BIN, f"{VENV_BIN}/") for a in argv]


def test_dockerfile_base_and_packages() -> None:
    ins = dockerfile_instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert froms and all(a.startswith("debian:bookworm") for a in froms)
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert "python3-bpfcc" in runs
    assert "linux-headers-$(dpkg --print-architecture)" in runs
    assert "--system-site-packages" in runs  # the venv must see Debian's bcc
    assert not [a for i, a in ins if i == "USER" and a not in ("0", "root", "0:0")]


def test_dockerfile_env_names_are_settings() -> None:
    names = set()
    for ins, args in dockerfile_instructions():
        if ins == "ENV":
            names |= {tok.split("=")[0] for tok in shlex.split(args)}
    xdpfw = {n for n in names if n.startswith("XDPFW_")}
    assert xdpfw <= setting_names(), xdpfw - setting_names()
    assert {"XDPFW_STATE_DIR", "XDPFW_BPFFS_DIR", "XDPFW_LISTEN"} <= xdpfw


def test_dockerfile_copies_are_in_the_build_context() -> None:
    keep = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for ins, args in dockerfile_instructions():
        if ins == "COPY":
            *sources, _dest = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), src
                assert src.rstrip("/") in keep, f"{src} is excluded by .dockerignore"


def test_container_command_runs_here() -> None:
    ins = dict(dockerfile_instructions())
    argv = local(exec_form(ins["ENTRYPOINT"]) + exec_form(ins["CMD"]))
    assert Path(argv[0]).exists(), argv[0]
    assert argv[1:] == ["serve", "--no-demo"]
    proc = subprocess.run(
        [*argv, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "--no-demo" in proc.stdout
    assert "XDPFW_IFACE" in proc.stdout


@pytest.mark.skipif(
    not list(Path("/usr/src").glob("linux-headers-*-common")),
    reason="no Debian kernel headers here (make setup installs them)",
)
def test_kernel_header_build_step_runs_here(tmp_path: Path) -> None:
    runs = [a for i, a in dockerfile_instructions() if i == "RUN" and "xdpfw.kernel.kheaders" in a]
    assert len(runs) == 1
    env_lines = [a for i, a in dockerfile_instructions() if i == "ENV"]
    assert any("XDPFW_KHEADERS_CACHE=/var/cache/xdpfw/kernel-headers" in e for e in env_lines)
    cache = tmp_path / "kernel-headers"
    command = runs[0].replace(f"{IMAGE_VENV_BIN}python", shlex.quote(sys.executable))
    env = {**os.environ, "XDPFW_KHEADERS_CACHE": str(cache)}
    env.pop("BCC_KERNEL_SOURCE", None)
    proc = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    # Whatever kernel runs here, the step builds the merged tree (the image needs it).
    (tree,) = cache.iterdir()
    assert f"kernel headers: {tree}" in proc.stdout
    assert (tree / "include" / "generated").is_dir()
    assert (tree / "include" / "linux").is_dir()


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    srv = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1], handler
    finally:
        srv.shutdown()
        srv.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_container_healthcheck_runs_here(health_server: tuple[int, type[_Health]]) -> None:
    port, handler = health_server
    args = dict(dockerfile_instructions())["HEALTHCHECK"]
    assert " CMD " in f" {args} "
    argv = local(exec_form(args.split(" CMD ", 1)[1]))
    argv = [
        a.replace("/opt/xdpfw/healthcheck.py", str(DEPLOY / "docker/healthcheck.py")) for a in argv
    ]

    def run(listen: str) -> int:
        env = {**os.environ, "XDPFW_LISTEN": listen}
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    assert run(f"127.0.0.1:{port}") == 0
    assert run(f"0.0.0.0:{port}") == 0  # a wildcard listener is checked on loopback
    handler.status = 503  # degraded: an interface is not attached
    assert run(f"127.0.0.1:{port}") == 1
    assert run(f"127.0.0.1:{_free_port()}") == 1  # nothing listening


# -- systemd ---------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "xdpfw.service"


def unit_entries() -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]} (keys repeat, so no configparser)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_values(key: str, section: str = "Service") -> list[str]:
    return [v for k, v in unit_entries()[section] if k == key]


def test_systemd_capabilities_are_exactly_the_documented_ones() -> None:
    wanted = {f"CAP_{c}" for c in CAPS}
    (bounding,) = unit_values("CapabilityBoundingSet")
    (ambient,) = unit_values("AmbientCapabilities")
    assert set(bounding.split()) == wanted
    assert set(ambient.split()) == wanted
    body = "\n".join(f"{k}={v}" for k, v in unit_entries()["Service"])
    assert "CAP_SYS_ADMIN" not in body


def test_systemd_hardening() -> None:
    assert unit_values("NoNewPrivileges") == ["yes"]
    assert unit_values("ProtectSystem") == ["strict"]
    assert unit_values("Restart") == ["on-failure"]
    user = unit_values("User")
    assert user == ["xdpfw"], "runs as a dedicated user, not root"
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelModules"):
        assert unit_values(key) == ["yes"], key
    assert unit_values("ReadWritePaths") == ["/sys/fs/bpf/xdpfw"]
    assert unit_values("ExecStart") == ["/opt/xdpfw/venv/bin/xdpfw serve --no-demo"]


def test_systemd_open_file_limit() -> None:
    """LimitNOFILE is set, well above the 1024 default that idle connections exhaust, and
    (soft:hard or one value) parses as systemd reads it."""
    (limit,) = unit_values("LimitNOFILE")
    soft, _, hard = limit.partition(":")
    assert soft.isdigit() and int(soft) >= 16384, limit
    assert not hard or (hard.isdigit() and int(hard) >= int(soft)), limit


def test_systemd_environment_names_are_settings() -> None:
    names = {v.split("=", 1)[0] for v in unit_values("Environment")}
    env_file = DEPLOY / "systemd" / "xdpfw.env"
    for line in env_file.read_text().splitlines():
        line = line.lstrip("#").strip()
        if re.match(r"^XDPFW_[A-Z_]+=", line):
            names.add(line.split("=", 1)[0])
    assert names <= setting_names(), names - setting_names()
    listen = next(v for v in unit_values("Environment") if v.startswith("XDPFW_LISTEN="))
    assert split_listen(listen.split("=", 1)[1])[0] == "127.0.0.1"
    assert unit_values("EnvironmentFile") == ["-/etc/default/xdpfw"]


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify`, with ExecStart pointing at this repository's venv.

    verify insists that ExecStart exists, and /opt/xdpfw is where the docs install to, not
    where this checkout lives; nothing else in the unit is changed.
    """
    assert SYSTEMD_ANALYZE is not None
    unit = tmp_path / "xdpfw.service"
    unit.write_text(UNIT.read_text().replace(IMAGE_VENV_BIN, f"{VENV_BIN}/"))
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "xdpfw.service" not in proc.stderr, proc.stderr  # no warnings about our unit


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_exposure_level(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    unit = tmp_path / "xdpfw.service"
    unit.write_text(UNIT.read_text().replace(IMAGE_VENV_BIN, f"{VENV_BIN}/"))
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for xdpfw.service: ([0-9.]+)", proc.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze has no offline security check: {proc.stderr[:200]}")
    assert float(match.group(1)) <= 2.5, proc.stdout[-3000:]


# -- Kubernetes ------------------------------------------------------------------------------

K8S = DEPLOY / "kubernetes"


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def daemonset() -> dict[str, Any]:
    (ds,) = [d for _, d in k8s_documents() if d["kind"] == "DaemonSet"]
    return ds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    docs = k8s_documents()
    assert {d["kind"] for _, d in docs} >= {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"}
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{name}: {doc['kind']} fails the {version} schema at {path}: {exc.message}"
            )


def test_kubernetes_schema_check_is_not_vacuous(daemonset: dict[str, Any]) -> None:
    bad = json.loads(json.dumps(daemonset))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitys"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def _container(ds: dict[str, Any]) -> dict[str, Any]:
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    return dict(c)


def test_daemonset_privileges(daemonset: dict[str, Any]) -> None:
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["automountServiceAccountToken"] is False
    assert "hostPID" not in pod and "hostIPC" not in pod
    sc = _container(daemonset)["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == sorted(CAPS)
    assert "SYS_ADMIN" not in json.dumps(daemonset)


def test_daemonset_mounts(daemonset: dict[str, Any]) -> None:
    pod = daemonset["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in _container(daemonset)["volumeMounts"]}
    bpffs = mounts["/sys/fs/bpf"]
    assert volumes[bpffs["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    assert bpffs.get("mountPropagation") != "Bidirectional"  # that one needs privileged
    assert "/tmp" in mounts
    env = {e["name"]: e for e in _container(daemonset)["env"]}
    assert env["XDPFW_STATE_DIR"]["value"] in mounts


def test_daemonset_api_probe_and_token(daemonset: dict[str, Any]) -> None:
    c = _container(daemonset)
    env = {e["name"]: e for e in c["env"]}
    host, port = split_listen(env["XDPFW_LISTEN"]["value"])
    assert host == "127.0.0.1"
    probe = c["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["host"], probe["port"]) == ("/healthz", host, port)
    assert c["startupProbe"]["tcpSocket"] == {"host": host, "port": port}
    # Liveness asks the service itself (API and watchdog), not /healthz: a degraded
    # interface must not restart the pod in a loop. The path is a route of the real app.
    live = c["livenessProbe"]["httpGet"]
    assert (live["path"], live["host"], live["port"]) == ("/livez", host, port)
    assert c["livenessProbe"]["timeoutSeconds"] <= c["livenessProbe"]["periodSeconds"]
    from api.app import create_app
    from api.settings import get_settings

    app = create_app(get_settings(), cast(Any, None), "token")
    paths = app.openapi()["paths"]
    assert "get" in paths["/healthz"] and "get" in paths["/livez"]
    ref = env["XDPFW_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "xdpfw-token"
    assert ref.get("optional", False) is False


def test_kubernetes_environment_names_are_settings(daemonset: dict[str, Any]) -> None:
    (cm,) = [d for _, d in k8s_documents() if d["kind"] == "ConfigMap"]
    names = set(cm["data"]) | {e["name"] for e in _container(daemonset)["env"]}
    assert names <= setting_names(), names - setting_names()
    assert _container(daemonset)["args"] == ["serve", "--no-demo"]


def test_kubernetes_readme_covers_every_node() -> None:
    text = (K8S / "README.md").read_text()
    assert "every node" in text
    assert "kubectl" in text and "xdpfw-token" in text


# -- the same list everywhere, and the docs ----------------------------------------------------


def test_docs_name_each_capability_and_what_was_exercised() -> None:
    text = (ROOT / "docs" / "deployment.md").read_text()
    for cap in CAPS:
        assert f"CAP_{cap}" in text
    assert "CAP_SYS_ADMIN" in text and "5.8" in text
    assert re.search(r"^#+ .*[Ww]hat was exercised", text, re.M)
    assert "prove-capabilities.sh" in text
