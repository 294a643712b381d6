"""A thin client of etcd's v3 JSON gateway (`/v3/...`, etcd >= 3.4): kv, txn, watch, lease.

Why not a library: docs/fleet.md ("The client"). Keys and values are bytes on our side and
base64 on the wire (the gateway's JSON mapping of the gRPC API). Every call tries the
endpoints in turn (the first that answers wins and is tried first next time), so a member
killed, the leader included, costs one connection error, not an outage.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "KV",
    "Compacted",
    "EtcdClient",
    "EtcdError",
    "EtcdUnavailable",
    "Event",
    "prefix_end",
]


class EtcdError(Exception):
    """etcd answered with an error (a bad request, a too-large request, ...)."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered: the store is down or out of reach."""


class Compacted(EtcdError):
    """The revision asked for is compacted away: only a full read can follow."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True)
class Event:
    kind: str  # "PUT" or "DELETE"
    kv: KV


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix`."""
    data = bytearray(prefix)
    while data:
        if data[-1] < 0xFF:
            data[-1] += 1
            return bytes(data)
        data.pop()
    return b"\0"


def _kv(raw: dict[str, Any]) -> KV:
    return KV(
        key=_unb64(raw.get("key")),
        value=_unb64(raw.get("value")),
        mod_revision=int(raw.get("mod_revision", 0)),
        create_revision=int(raw.get("create_revision", 0)),
        version=int(raw.get("version", 0)),
        lease=int(raw.get("lease", 0)),
    )


class EtcdClient:
    """One etcd cluster, by its client URLs (http:// or https:// with the CA/cert/key)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not endpoints:
            raise ValueError("name at least one etcd endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._first = 0
        self._lock = threading.Lock()
        verify: Any = str(ca) if ca else True
        certs = (str(cert), str(key)) if cert and key else None
        self._timeout = timeout
        self._http = httpx.Client(timeout=timeout, verify=verify, cert=certs)
        self._stream_args: dict[str, Any] = {"verify": verify, "cert": certs}
        self._streams: set[httpx.Client] = set()  # the watches in progress
        self._socks: dict[httpx.Client, socket.socket] = {}  # and their sockets
        # Bytes received (response bodies as sent by the gateway): on watch streams, and on
        # every other call (range reads of chunks, txns, ...). xdpfw_fleet_*_bytes_total.
        self.watch_bytes = 0
        self.call_bytes = 0

    def abort_watches(self) -> None:
        """End every watch in progress now (their generators return): the stream's socket is
        shut down, so a read blocked on a quiet watch returns at once, not after its read
        timeout (closing the client alone does not wake it)."""
        with self._lock:
            streams = list(self._streams)
            socks = list(self._socks.values())
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for http in streams:
            http.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _order(self) -> list[str]:
        with self._lock:
            first = self._first
        return self.endpoints[first:] + self.endpoints[:first]

    def _good(self, endpoint: str) -> None:
        with self._lock:
            self._first = self.endpoints.index(endpoint)

    def call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """POST `body` to /v3/`path` on the first endpoint that answers."""
        errors: list[str] = []
        for endpoint in self._order():
            try:
                r = self._http.post(
                    f"{endpoint}/v3/{path}", json=body,
                    timeout=timeout if timeout is not None else self._timeout,
                )
            except httpx.HTTPError as exc:
                errors.append(f"{endpoint}: {type(exc).__name__} {exc}".strip())
                continue
            self.call_bytes += len(r.content)
            if r.status_code == 200:
                self._good(endpoint)
                return r.json()
            detail = _error_text(r)
            if r.status_code in (502, 503) or "no leader" in detail or "timed out" in detail:
                errors.append(f"{endpoint}: {detail}")  # this member cannot serve: the next
                continue
            raise EtcdError(f"etcd {path}: {detail}")
        raise EtcdUnavailable("; ".join(errors) or "no endpoint")

    # -- kv ------------------------------------------------------------------------------------

    def get(self, key: bytes) -> tuple[KV | None, int]:
        """The key (None: absent) and the store's revision."""
        kvs, rev = self.range(key)
        return (kvs[0] if kvs else None), rev

    def range(
        self, key: bytes, end: bytes | None = None, revision: int = 0, keys_only: bool = False
    ) -> tuple[list[KV], int]:
        body: dict[str, Any] = {"key": _b64(key)}
        if end is not None:
            body["range_end"] = _b64(end)
        if revision:
            body["revision"] = revision
        if keys_only:
            body["keys_only"] = True
        try:
            out = self.call("kv/range", body)
        except EtcdError as exc:
            if "compacted" in str(exc):
                raise Compacted(0) from exc
            raise
        return [_kv(k) for k in out.get("kvs", [])], int(out["header"]["revision"])

    def prefix(self, prefix: bytes, revision: int = 0) -> tuple[list[KV], int]:
        return self.range(prefix, prefix_end(prefix), revision)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        return int(self.call("kv/put", body)["header"]["revision"])

    def delete(self, key: bytes, end: bytes | None = None) -> tuple[int, int]:
        """(keys deleted, revision)."""
        body: dict[str, Any] = {"key": _b64(key)}
        if end is not None:
            body["range_end"] = _b64(end)
        out = self.call("kv/deleterange", body)
        return int(out.get("deleted", 0)), int(out["header"]["revision"])

    def txn(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> tuple[bool, int, list[Any]]:
        """(succeeded, revision, responses). Build the parts with the helpers below."""
        out = self.call("kv/txn", {"compare": compare, "success": success,
                                   "failure": failure or []})
        return bool(out.get("succeeded", False)), int(out["header"]["revision"]), out.get(
            "responses", []
        )

    @staticmethod
    def cmp_mod(key: bytes, mod_revision: int) -> dict[str, Any]:
        """Compare: `key`'s mod_revision equals this (0: the key does not exist)."""
        return {"key": _b64(key), "target": "MOD", "result": "EQUAL",
                "mod_revision": mod_revision}

    @staticmethod
    def op_put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
        req: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            req["lease"] = lease
        return {"request_put": req}

    @staticmethod
    def op_delete(key: bytes, end: bytes | None = None) -> dict[str, Any]:
        req = {"key": _b64(key)}
        if end is not None:
            req["range_end"] = _b64(end)
        return {"request_delete_range": req}

    def compact(self, revision: int) -> None:
        self.call("kv/compaction", {"revision": revision, "physical": True})

    # -- lease ---------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self.call("lease/grant", {"TTL": ttl})["ID"])

    def keepalive(self, lease: int) -> int:
        """Refresh the lease once; its remaining TTL (0: it has expired)."""
        out = self.call("lease/keepalive", {"ID": lease})
        return int(out.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self.call("lease/revoke", {"ID": lease})

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("maintenance/status", {})
        return result

    # -- watch ---------------------------------------------------------------------------------

    def watch(
        self, prefix: bytes, start_revision: int, stop: threading.Event,
        progress_every: float = 2.0,
    ) -> Iterator[tuple[int, list[Event]]]:
        """Yield (revision, events) from `start_revision` on, for every key under `prefix`,
        until `stop` is set or the stream breaks (EtcdUnavailable; the caller reconnects from
        its last revision). Compacted when `start_revision` is gone. Progress notifications
        (no events) come every ~10 min from etcd; the stream's read timeout catches a dead
        member sooner: the watcher reconnects."""
        body = {"create_request": {
            "key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
            "start_revision": start_revision, "progress_notify": True,
        }}
        errors: list[str] = []
        self._yielded = False
        for endpoint in self._order():
            http = httpx.Client(
                timeout=httpx.Timeout(self._timeout, read=progress_every), **self._stream_args
            )
            with self._lock:
                self._streams.add(http)
            try:
                with http.stream("POST", f"{endpoint}/v3/watch", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"{endpoint}: HTTP {r.status_code}")
                        continue
                    net = r.extensions.get("network_stream")
                    sock = net.get_extra_info("socket") if net is not None else None
                    if isinstance(sock, socket.socket):
                        with self._lock:
                            self._socks[http] = sock
                    if stop.is_set():  # stopped while connecting: abort_watches missed it
                        return
                    self._good(endpoint)
                    yield from self._events(endpoint, r, stop)
                    return
            except (httpx.HTTPError, StopIteration, RuntimeError) as exc:
                if stop.is_set():
                    return
                errors.append(f"{endpoint}: {type(exc).__name__} {exc}".strip())
                if self._yielded:  # the caller resumes from what it has seen
                    break
                continue
            finally:
                with self._lock:
                    self._streams.discard(http)
                    self._socks.pop(http, None)
                http.close()
        raise EtcdUnavailable("; ".join(errors) or "watch ended")

    def _events(
        self, endpoint: str, r: httpx.Response, stop: threading.Event
    ) -> Iterator[tuple[int, list[Event]]]:
        lines = r.iter_lines()
        while not stop.is_set():
            try:
                line = next(lines)
            except httpx.ReadTimeout:
                # Quiet for a while: check the member still serves (a member cut off keeps
                # a stream open and silent), then end: the caller watches again from its
                # last revision.
                self._check(endpoint)
                return
            self.watch_bytes += len(line) + 1  # the gateway's JSON is ASCII; + the newline
            if not line.strip():
                continue
            msg = json.loads(line)
            if "error" in msg:
                raise EtcdUnavailable(f"{endpoint}: watch: {msg['error']}")
            res = msg.get("result", {})
            if int(res.get("compact_revision", 0)):
                raise Compacted(int(res["compact_revision"]))
            if res.get("canceled"):
                raise EtcdUnavailable(
                    f"{endpoint}: watch canceled: {res.get('cancel_reason', '')}"
                )
            rev = int(res.get("header", {}).get("revision", 0))
            events = [Event(e.get("type", "PUT"), _kv(e["kv"])) for e in res.get("events", [])]
            if events:  # header.revision may run ahead of a split batch
                rev = max(ev.kv.mod_revision for ev in events)
            if events or not res.get("created"):
                self._yielded = True
                yield rev, events

    def _check(self, endpoint: str) -> None:
        try:
            r = self._http.post(f"{endpoint}/v3/kv/range",
                                json={"key": _b64(b"\0"), "limit": 1}, timeout=2.0)
        except httpx.HTTPError as exc:
            raise EtcdUnavailable(f"{endpoint}: {exc}") from exc
        if r.status_code != 200:
            raise EtcdUnavailable(f"{endpoint}: {_error_text(r)}")


def _error_text(r: httpx.Response) -> str:
    try:
        data = r.json()
    except ValueError:
        return f"HTTP {r.status_code} {r.text[:200]}"
    return f"HTTP {r.status_code} {data.get('error') or data.get('message') or data}"
