"""The fleet's desired state in etcd: the key layout, the chunk codec, and the writes.

Under the prefix P (default /xdpfw):

  P/desired/sources/<name>        manifest of a source loaded as a list (JSON: gen, chunks,
                                  count, comment, expires_at, writer, at)
  P/chunks/<name>/<gen>/<i>       the list itself, in chunks of <= CHUNK_BYTES (JSON: codes,
                                  optional per-entry comments and ttls); not watched
  P/desired/rules/<name>/<code>   one rule held by source <name> (POST /v1/rules), JSON
                                  (comment, expires_at), under a lease when it has a TTL
  P/head                          touched by every write: its mod_revision is the newest
                                  change (a node's lag = head - applied)
  P/nodes/<node>                  the node registry (api/fleet/agent.py), under a lease

A source's desired membership is its manifest's list plus its rule keys. A replace writes the
chunks under a fresh generation first (invisible: no manifest names them), then ONE txn that
compares the manifest's mod_revision with the one read at the start, puts the new manifest,
deletes the old generation's chunks and the source's rule keys: of two writers of a source one
wins whole, the other gets Conflict (its chunks are deleted). etcd's request limit (1.5 MiB by
default) bounds a chunk, not a source.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from api.fleet.etcd import KV, EtcdClient, prefix_end
from xdpfw.rules import rule_from_code

__all__ = [
    "CHUNK_BYTES",
    "Conflict",
    "Desired",
    "Layout",
    "decode_source",
    "encode_chunks",
]

# Raw JSON per chunk: x4/3 in base64 on the gateway, under etcd's 1.5 MiB request limit.
# XDPFW_FLEET_CHUNK_BYTES makes it smaller (the tests: many chunks from a small list).
CHUNK_BYTES = int(os.environ.get("XDPFW_FLEET_CHUNK_BYTES", 768 * 1024))


class Conflict(Exception):
    """Another writer changed the source between this write's read and its commit."""


@dataclass(frozen=True)
class Layout:
    prefix: str = "/xdpfw"

    def _k(self, *parts: str) -> bytes:
        return ("/".join([self.prefix.rstrip("/"), *parts])).encode()

    @property
    def desired(self) -> bytes:
        return self._k("desired", "")

    def manifest(self, name: str) -> bytes:
        return self._k("desired", "sources", name)

    def chunks(self, name: str, gen: str | None = None) -> bytes:
        return self._k("chunks", name, gen, "") if gen else self._k("chunks", name, "")

    def chunk(self, name: str, gen: str, i: int) -> bytes:
        return self._k("chunks", name, gen, f"{i:06d}")

    def rules(self, name: str) -> bytes:
        return self._k("desired", "rules", name, "")

    def rule(self, name: str, code: int) -> bytes:
        return self._k("desired", "rules", name, f"{code:x}")

    @property
    def head(self) -> bytes:
        return self._k("head")

    @property
    def nodes(self) -> bytes:
        return self._k("nodes", "")

    def node(self, name: str) -> bytes:
        return self._k("nodes", name)

    def source_of(self, key: bytes) -> str | None:
        """The source a desired key belongs to (None: not a desired key)."""
        rest = key[len(self.desired):].decode(errors="replace").split("/")
        if len(rest) >= 2 and rest[0] in ("sources", "rules") and rest[1]:
            return rest[1]
        return None


def encode_chunks(
    codes: Sequence[int], comments: Sequence[str] | None, ttls: Sequence[int | None] | None
) -> list[bytes]:
    """The list as JSON chunks of at most ~CHUNK_BYTES each."""
    out: list[bytes] = []
    start = 0
    n = len(codes)
    while start < n or not out:
        size = 40
        end = start
        while end < n and (size < CHUNK_BYTES or end == start):
            size += len(str(codes[end])) + 1
            if comments is not None:
                size += len(json.dumps(comments[end])) + 1
            if ttls is not None:
                size += 12
            end += 1
        body: dict[str, Any] = {"codes": list(codes[start:end])}
        if comments is not None:
            body["comments"] = list(comments[start:end])
        if ttls is not None:
            body["ttls"] = list(ttls[start:end])
        out.append(json.dumps(body, separators=(",", ":")).encode())
        start = end
        if n == 0:
            break
    return out


@dataclass
class Desired:
    """One source's desired membership, as the applier hands it to replace_source."""

    name: str
    codes: list[int] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    ttls: list[int | None] = field(default_factory=list)
    uniform: tuple[str, int | None] | None = None  # one comment and TTL for every entry
    nodes: list[str] | None = None  # scope: only these nodes (None: every node)
    selector: dict[str, str] | None = None  # scope: only nodes with all these labels

    def __len__(self) -> int:
        return len(self.codes)

    def applies_to(self, node: str, labels: dict[str, str]) -> bool:
        if self.nodes is not None and node not in self.nodes:
            return False
        return self.selector is None or all(labels.get(k) == v
                                            for k, v in self.selector.items())


def _ttl_left(expires_at: float | None, now: float) -> int | bool | None:
    """Seconds left (None: no expiry; False: expired already)."""
    if expires_at is None:
        return None
    left = int(expires_at - now + 0.999)
    return left if left > 0 else False


def decode_source(
    name: str, manifest: KV | None, chunks: Sequence[KV], rules: Sequence[KV],
    now: float | None = None,
) -> Desired | None:
    """The desired membership from a manifest, its chunks (in key order) and rule keys;
    None when the source does not exist in the store."""
    if manifest is None and not rules:
        return None
    now = time.time() if now is None else now
    d = Desired(name)
    if manifest is not None:
        m = json.loads(manifest.value)
        d.nodes = m.get("nodes")
        d.selector = m.get("selector")
        if len(chunks) != int(m["chunks"]):
            raise ValueError(f"source {name}: {len(chunks)} chunk(s) of {m['chunks']}")
        left = _ttl_left(m.get("expires_at"), now)
        ttl = left if isinstance(left, int) else None
        bodies = [json.loads(c.value) for c in chunks]
        if left is not False:
            for body in bodies:
                codes = body["codes"]
                d.codes.extend(codes)
                d.comments.extend(body.get("comments") or [m.get("comment", "")] * len(codes))
                d.ttls.extend(body.get("ttls") or [ttl] * len(codes))
        if not any("comments" in b or "ttls" in b for b in bodies):
            d.uniform = (m.get("comment", ""), ttl)
    if rules:
        d.uniform = None
        index = {c: i for i, c in enumerate(d.codes)}
        for kv in rules:
            body = json.loads(kv.value)
            left = _ttl_left(body.get("expires_at"), now)
            if left is False:
                continue
            code = int(kv.key.rsplit(b"/", 1)[1], 16)
            ttl = left if isinstance(left, int) else None
            if code in index:
                d.comments[index[code]] = body.get("comment", "")
                d.ttls[index[code]] = ttl
            else:
                index[code] = len(d.codes)
                d.codes.append(code)
                d.comments.append(body.get("comment", ""))
                d.ttls.append(ttl)
    return d


class Writer:
    """The writes of the REST API in fleet mode: each commits to etcd and returns the
    revision it committed at."""

    def __init__(self, etcd: EtcdClient, layout: Layout, node: str) -> None:
        self.etcd = etcd
        self.layout = layout
        self.node = node

    def _head(self) -> dict[str, Any]:
        return EtcdClient.op_put(self.layout.head, self.node.encode())

    def replace_source(
        self, name: str, codes: Sequence[int], comment: str = "", ttl: int | None = None,
        comments: Sequence[str] | None = None, ttls: Sequence[int | None] | None = None,
        nodes: Sequence[str] | None = None, selector: dict[str, str] | None = None,
    ) -> tuple[int, tuple[int, int, int]]:
        """(revision, (added, removed, unchanged) against the version it replaced)."""
        L = self.layout
        old, _ = self.etcd.get(L.manifest(name))
        old_gen = json.loads(old.value)["gen"] if old is not None else None
        before: set[int] = set()
        if old_gen is not None:
            kvs, _ = self.etcd.prefix(L.chunks(name, old_gen))
            before = {c for kv in kvs for c in json.loads(kv.value)["codes"]}
        rules, _ = self.etcd.prefix(L.rules(name))
        before.update(int(kv.key.rsplit(b"/", 1)[1], 16) for kv in rules)
        after = set(codes)
        gen = uuid.uuid4().hex[:16]
        lease = self.etcd.grant(ttl) if ttl else 0
        parts = encode_chunks(codes, comments, ttls)
        try:
            for i, part in enumerate(parts):
                self.etcd.put(L.chunk(name, gen, i), part, lease)
            manifest = {
                "gen": gen, "chunks": len(parts), "count": len(codes), "comment": comment,
                "expires_at": time.time() + ttl if ttl else None, "writer": self.node,
                "at": time.time(),
                "nodes": list(nodes) if nodes is not None else None, "selector": selector,
            }
            ops = [
                EtcdClient.op_put(L.manifest(name), json.dumps(manifest).encode(), lease),
                EtcdClient.op_delete(L.rules(name), prefix_end(L.rules(name))),
                self._head(),
            ]
            if old_gen is not None:
                ops.append(EtcdClient.op_delete(L.chunks(name, old_gen),
                                                prefix_end(L.chunks(name, old_gen))))
            ok, rev, _ = self.etcd.txn(
                [EtcdClient.cmp_mod(L.manifest(name), old.mod_revision if old else 0)], ops
            )
        except BaseException:
            self._forget(name, gen)
            raise
        if not ok:
            self._forget(name, gen)
            raise Conflict(name)
        same = len(after & before)
        return rev, (len(after) - same, len(before) - same, same)

    def _forget(self, name: str, gen: str) -> None:
        try:
            prefix = self.layout.chunks(name, gen)
            self.etcd.delete(prefix, prefix_end(prefix))
        except Exception:
            pass

    def drop_source(self, name: str) -> tuple[int, int]:
        """(keys removed: manifest + rule keys, revision); 0 keys: no such source."""
        L = self.layout
        old, _ = self.etcd.get(L.manifest(name))
        ops = [
            EtcdClient.op_delete(L.manifest(name)),
            EtcdClient.op_delete(L.rules(name), prefix_end(L.rules(name))),
            self._head(),
        ]
        if old is not None:
            gen = json.loads(old.value)["gen"]
            ops.append(EtcdClient.op_delete(L.chunks(name, gen), prefix_end(L.chunks(name, gen))))
        ok, rev, responses = self.etcd.txn(
            [EtcdClient.cmp_mod(L.manifest(name), old.mod_revision if old else 0)], ops
        )
        if not ok:
            raise Conflict(name)
        deleted = sum(int(r.get("response_delete_range", {}).get("deleted", 0))
                      for r in responses[:2])
        return deleted, rev

    def add_rule(self, name: str, code: int, comment: str, ttl: int | None) -> int:
        rule_from_code(1, code)  # a code that decodes (the route made it from a RuleSpec)
        lease = self.etcd.grant(ttl) if ttl else 0
        body = {"comment": comment, "expires_at": time.time() + ttl if ttl else None,
                "writer": self.node, "at": time.time()}
        _, rev, _ = self.etcd.txn([], [
            EtcdClient.op_put(self.layout.rule(name, code), json.dumps(body).encode(), lease),
            self._head(),
        ])
        return rev

    def remove_rules(self, pairs: Sequence[tuple[str, int]]) -> tuple[int, int]:
        """Delete rule keys (source, code): (keys deleted, revision)."""
        ops = [EtcdClient.op_delete(self.layout.rule(s, c)) for s, c in pairs]
        _, rev, responses = self.etcd.txn([], [*ops, self._head()])
        deleted = sum(int(r.get("response_delete_range", {}).get("deleted", 0))
                      for r in responses[: len(ops)])
        return deleted, rev
