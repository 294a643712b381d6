"""The fleet's desired state in etcd: the key layout, the chunk codec, and the writes.

Under the prefix P (default /xdpfw):

  P/desired/sources/<name>        manifest of a source loaded as a list (JSON: gen, chunks,
                                  count, comment, expires_at, writer, at)
  P/chunks/<name>/<gen>/<i>       the list itself, in chunks of <= CHUNK_BYTES (JSON: codes,
                                  optional per-entry comments and ttls); not watched
  P/desired/rules/<name>/<code>   one rule held by source <name> (POST /v1/rules), JSON
                                  (comment, expires_at, nodes, selector), under a lease when
                                  it has a TTL
  P/desired/protected             the fleet's protected prefixes: a JSON list of CIDRs,
                                  the whole list in one key (one txn per change)
  P/head                          touched by every write: its mod_revision is the newest
                                  change (a node's lag = head - applied)
  P/nodes/<node>                  the node registry (api/fleet/agent.py), under a lease

A source's desired membership is its manifest's list plus its rule keys. A replace writes the
chunks under a fresh generation first (invisible: no manifest names them), then ONE txn that
compares the manifest's mod_revision with the one read at the start, puts the new manifest,
deletes the old generation's chunks and the source's rule keys: of two writers of a source one
wins whole, the other gets Conflict (its chunks are deleted). etcd's request limit (1.5 MiB by
default) bounds a chunk, not a source.

A bulk add (POST /v1/rules/bulk) joins its source's list: a new generation holding the old
list and the new entries, made current by the same one txn (the rule keys stay). A delete by
value or id takes the matching rule keys and, for each list holding a match, a new generation
without it, all in one txn.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from api.fleet.etcd import KV, EtcdClient, prefix_end
from xdpfw.rules import rule_from_code

__all__ = [
    "CHUNK_BYTES",
    "Conflict",
    "Desired",
    "Layout",
    "Scope",
    "Writer",
    "chunk_body",
    "decode_source",
    "encode_chunks",
    "in_scope",
    "protected_prefixes",
    "rule_code",
]

# Raw JSON per chunk: x4/3 in base64 on the gateway, under etcd's 1.5 MiB request limit.
# XDPFW_FLEET_CHUNK_BYTES makes it smaller (the tests: many chunks from a small list).
CHUNK_BYTES = int(os.environ.get("XDPFW_FLEET_CHUNK_BYTES", 768 * 1024))


Scope = tuple[list[str] | None, dict[str, str] | None]  # (nodes, selector): None = any


def in_scope(scope: Scope, node: str, labels: dict[str, str]) -> bool:
    """Whether `node` with `labels` is in a scope (named, if nodes are named; carrying every
    label of the selector, if there is one)."""
    nodes, selector = scope
    if nodes is not None and node not in nodes:
        return False
    return selector is None or all(labels.get(k) == v for k, v in selector.items())


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
    def protected(self) -> bytes:
        return self._k("desired", "protected")

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
    codes: Sequence[int], comments: Sequence[str] | None, ttls: Sequence[int | None] | None,
    expires: Sequence[float | None] | None = None,
) -> list[bytes]:
    """The list as chunks of at most ~CHUNK_BYTES of JSON each, zlib-compressed (a list of
    codes packs ~2.3x: etcd stores, replicates and serves that much less; `chunk_body`
    reads both forms). Per entry, optionally: its comment, its TTL (seconds from when a
    node applies it) or its expiry (unix time)."""
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
            if expires is not None:
                size += 19
            end += 1
        body: dict[str, Any] = {"codes": list(codes[start:end])}
        if comments is not None:
            body["comments"] = list(comments[start:end])
        if ttls is not None:
            body["ttls"] = list(ttls[start:end])
        if expires is not None:
            body["expires"] = [None if e is None else round(e, 3) for e in expires[start:end]]
        out.append(zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 1))
        start = end
        if n == 0:
            break
    return out


def chunk_body(value: bytes) -> dict[str, Any]:
    """A chunk's JSON body: zlib-compressed (a zlib stream starts with 0x78, `x`) or, as
    written before compression, plain JSON (which starts with `{`)."""
    body: dict[str, Any] = json.loads(zlib.decompress(value) if value[:1] == b"x" else value)
    return body


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
    # the scopes of single rules (POST /v1/rules with nodes/selector), by code: entries that
    # only such a rule key holds (an entry of the list is everywhere the source is)
    scopes: dict[int, Scope] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.codes)

    def applies_to(self, node: str, labels: dict[str, str]) -> bool:
        return in_scope((self.nodes, self.selector), node, labels)

    def for_node(self, node: str, labels: dict[str, str]) -> Desired:
        """The entries `node` enforces: the scoped rules of other nodes left out."""
        if not self.scopes:
            return self
        out = Desired(self.name, uniform=self.uniform, nodes=self.nodes,
                      selector=self.selector)
        for i, code in enumerate(self.codes):
            scope = self.scopes.get(code)
            if scope is None or in_scope(scope, node, labels):
                out.codes.append(code)
                out.comments.append(self.comments[i])
                out.ttls.append(self.ttls[i])
        return out


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
        bodies = [chunk_body(c.value) for c in chunks]
        if left is not False:
            for body in bodies:
                codes = body["codes"]
                comments = body.get("comments") or [m.get("comment", "")] * len(codes)
                if "expires" in body:  # absolute expiries (a bulk add): the expired left out
                    for code, cm, exp in zip(codes, comments, body["expires"], strict=True):
                        left_i = _ttl_left(exp, now)
                        if left_i is not False:
                            d.codes.append(code)
                            d.comments.append(cm)
                            d.ttls.append(left_i if isinstance(left_i, int) else ttl)
                    continue
                d.codes.extend(codes)
                d.comments.extend(comments)
                d.ttls.extend(body.get("ttls") or [ttl] * len(codes))
        if not any("comments" in b or "ttls" in b or "expires" in b for b in bodies):
            d.uniform = (m.get("comment", ""), ttl)
    if rules:
        d.uniform = None
        index = {c: i for i, c in enumerate(d.codes)}
        for kv in rules:
            body = json.loads(kv.value)
            left = _ttl_left(body.get("expires_at"), now)
            if left is False:
                continue
            code = rule_code(kv.key)
            ttl = left if isinstance(left, int) else None
            if code in index:
                d.comments[index[code]] = body.get("comment", "")
                d.ttls[index[code]] = ttl
            else:
                index[code] = len(d.codes)
                d.codes.append(code)
                d.comments.append(body.get("comment", ""))
                d.ttls.append(ttl)
                if body.get("nodes") is not None or body.get("selector") is not None:
                    d.scopes[code] = (body.get("nodes"), body.get("selector"))
    return d


def protected_prefixes(value: bytes | None) -> list[str]:
    """The prefixes in a P/desired/protected value (None or empty: none)."""
    if not value:
        return []
    prefixes = json.loads(value)
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        raise ValueError(f"the fleet's protected prefixes are not a list of CIDRs: {prefixes!r}")
    return prefixes


def rule_code(key: bytes) -> int:
    """The code in a rule key (P/desired/rules/<name>/<code in hex>)."""
    return int(key.rsplit(b"/", 1)[1], 16)


def _list_entries(manifest: dict[str, Any], chunks: Sequence[KV], now: float
                  ) -> tuple[list[int], list[str], list[float | None]]:
    """A list's live entries with their comments and absolute expiries (None: none)."""
    codes: list[int] = []
    comments: list[str] = []
    expires: list[float | None] = []
    whole = manifest.get("expires_at")
    if whole is not None and whole <= now:
        return codes, comments, expires
    for kv in chunks:
        body = chunk_body(kv.value)
        n = len(body["codes"])
        cms = body.get("comments") or [manifest.get("comment", "")] * n
        if "expires" in body:
            exps = body["expires"]
        elif body.get("ttls"):  # seconds from an apply: from the list's write, here
            at = float(manifest.get("at") or now)
            exps = [None if t is None else at + t for t in body["ttls"]]
        else:
            exps = [whole] * n
        for code, cm, exp in zip(body["codes"], cms, exps, strict=True):
            if exp is None or exp > now:
                codes.append(code)
                comments.append(cm)
                expires.append(exp)
    return codes, comments, expires


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
            before = {c for kv in kvs for c in chunk_body(kv.value)["codes"]}
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

    def set_protected(self, prefixes: Sequence[str], if_revision: int | None = None) -> int:
        """The fleet's protected prefixes, the whole list, in one txn: its revision.
        `if_revision`: only if the key's mod_revision is still that (0: never written), else
        Conflict (a read-modify-write, as `xdpfw fleet protect add` does)."""
        compare = ([] if if_revision is None
                   else [EtcdClient.cmp_mod(self.layout.protected, if_revision)])
        ok, rev, _ = self.etcd.txn(compare, [
            EtcdClient.op_put(self.layout.protected, json.dumps(list(prefixes)).encode()),
            self._head(),
        ])
        if not ok:
            raise Conflict("the fleet's protected prefixes")
        return rev

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

    def add_rule(self, name: str, code: int, comment: str, ttl: int | None,
                 nodes: Sequence[str] | None = None,
                 selector: dict[str, str] | None = None) -> int:
        """One rule key; `nodes`/`selector`: only the nodes in that scope enforce it."""
        rule_from_code(1, code)  # a code that decodes (the route made it from a RuleSpec)
        lease = self.etcd.grant(ttl) if ttl else 0
        body: dict[str, Any] = {"comment": comment,
                                "expires_at": time.time() + ttl if ttl else None,
                                "writer": self.node, "at": time.time()}
        if nodes is not None:
            body["nodes"] = list(nodes)
        if selector is not None:
            body["selector"] = dict(selector)
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

    # -- bulk add and delete by value (POST /v1/rules/bulk, DELETE /v1/rules?src=) ----------

    def add_to_source(
        self, name: str, codes: Sequence[int], comments: Sequence[str],
        expires: Sequence[float | None], attempts: int = 8,
    ) -> tuple[int, int, int]:
        """A bulk add: the entries join source `name`'s list (a new generation: the old
        list plus the entries it did not hold, made current by one txn; the source's rule
        keys and scope stay). (revision, added, duplicates). Two bulks of one source at
        once: the one that loses the txn's compare reads again and retries (adding is
        order-free) after a short random pause, up to `attempts` times, then Conflict."""
        for attempt in range(attempts):
            try:
                return self._add_to_source(name, codes, comments, expires)
            except Conflict:
                if attempt == attempts - 1:
                    raise
                time.sleep(random.uniform(0, 0.02 * (attempt + 1)))  # the two fall apart
        raise AssertionError("unreachable")

    def _add_to_source(
        self, name: str, codes: Sequence[int], comments: Sequence[str],
        expires: Sequence[float | None],
    ) -> tuple[int, int, int]:
        L = self.layout
        now = time.time()
        old, rev = self.etcd.get(L.manifest(name))
        manifest: dict[str, Any] = json.loads(old.value) if old is not None else {}
        have: list[int] = []
        have_comments: list[str] = []
        have_expires: list[float | None] = []
        if old is not None:
            chunks, _ = self.etcd.prefix(L.chunks(name, manifest["gen"]), revision=rev)
            have, have_comments, have_expires = _list_entries(manifest, chunks, now)
        rules, _ = self.etcd.prefix(L.rules(name), revision=rev)
        held = set(have) | {rule_code(kv.key) for kv in rules}
        add: list[int] = []
        for i, code in enumerate(codes):
            if code not in held:
                held.add(code)
                add.append(i)
        if not add:
            return rev, 0, len(codes)
        all_codes = [*have, *(codes[i] for i in add)]
        all_comments = [*have_comments, *(comments[i] for i in add)]
        all_expires = [*have_expires, *(expires[i] for i in add)]
        uniform = len(set(all_comments)) <= 1
        new = {
            "gen": uuid.uuid4().hex[:16], "count": len(all_codes),
            "comment": all_comments[0] if uniform and all_comments else "",
            "expires_at": None, "writer": self.node, "at": now,
            "nodes": manifest.get("nodes"), "selector": manifest.get("selector"),
        }
        rev = self._commit([(name, old, new, all_codes, None if uniform else all_comments,
                             all_expires if any(e is not None for e in all_expires) else None)],
                           [])
        return rev, len(add), len(codes) - len(add)

    def remove_matching(
        self, match: Callable[[int], bool], source: str | None = None,
        lists: Callable[[str, KV], bool] = lambda name, manifest: True,
    ) -> tuple[int, int]:
        """A delete by value or id: every rule key whose code matches and every matching
        entry of a list (of `source` only, when named) go in ONE txn; a list that held one
        becomes a new generation without it. `lists(name, manifest kv)`: whether a source's
        list may hold a match and must be read (the caller knows which ones its node
        holds). (entries removed, revision); 0 removed: nothing matched, nothing written."""
        L = self.layout
        kvs, rev = self.etcd.prefix(L.desired)
        compare: list[dict[str, Any]] = []
        ops: list[dict[str, Any]] = []
        removed = 0
        changes: list[tuple[str, KV, dict[str, Any], list[int], list[str] | None,
                            list[float | None] | None]] = []
        now = time.time()
        for kv in kvs:
            name = L.source_of(kv.key)
            if name is None or (source is not None and name != source):
                continue
            if kv.key != L.manifest(name):
                if match(rule_code(kv.key)):
                    compare.append(EtcdClient.cmp_mod(kv.key, kv.mod_revision))
                    ops.append(EtcdClient.op_delete(kv.key))
                    removed += 1
                continue
            if not lists(name, kv):
                continue
            manifest = json.loads(kv.value)
            chunks, _ = self.etcd.prefix(L.chunks(name, manifest["gen"]), revision=rev)
            codes, comments, expires = _list_entries(manifest, chunks, now)
            keep = [i for i, c in enumerate(codes) if not match(c)]
            if len(keep) == len(codes):
                continue
            removed += len(codes) - len(keep)
            kept_comments = [comments[i] for i in keep]
            kept_expires = [expires[i] for i in keep]
            uniform = len(set(kept_comments)) <= 1
            new = {**manifest, "gen": uuid.uuid4().hex[:16], "count": len(keep),
                   "writer": self.node, "at": now,
                   "comment": kept_comments[0] if uniform and kept_comments
                   else manifest.get("comment", "")}
            changes.append((name, kv, new, [codes[i] for i in keep],
                            None if uniform else kept_comments,
                            kept_expires if any(e is not None for e in kept_expires) else None))
        if not removed:
            return 0, rev
        return removed, self._commit(changes, ops, compare)

    def _commit(
        self,
        lists: Iterable[tuple[str, KV | None, dict[str, Any], list[int], list[str] | None,
                              list[float | None] | None]],
        ops: list[dict[str, Any]], compare: list[dict[str, Any]] | None = None,
    ) -> int:
        """New generations of lists (name, old manifest, new manifest, codes, comments,
        expiries) written first, then ONE txn: if no manifest (nor compared key) changed
        since it was read, the new manifests go in, the old generations out, and `ops`
        run: its revision. Conflict (the new chunks deleted) when another writer came
        first."""
        L = self.layout
        compare = list(compare or [])
        ops = list(ops)
        written: list[tuple[str, str]] = []
        try:
            for name, old, manifest, codes, comments, expires in lists:
                # A source's TTL lease stays with a list that keeps the source's expiry (a
                # delete); a bulk moves that expiry onto each old entry and drops the lease.
                lease = old.lease if old is not None and manifest.get("expires_at") else 0
                parts = encode_chunks(codes, comments, None, expires)
                for i, part in enumerate(parts):
                    if not written or written[-1] != (name, manifest["gen"]):
                        written.append((name, manifest["gen"]))
                    self.etcd.put(L.chunk(name, manifest["gen"], i), part, lease)
                manifest["chunks"] = len(parts)
                compare.append(EtcdClient.cmp_mod(L.manifest(name),
                                                  old.mod_revision if old else 0))
                ops.append(EtcdClient.op_put(L.manifest(name), json.dumps(manifest).encode(),
                                             lease))
                if old is not None:
                    gen = json.loads(old.value)["gen"]
                    ops.append(EtcdClient.op_delete(L.chunks(name, gen),
                                                    prefix_end(L.chunks(name, gen))))
            ok, rev, _ = self.etcd.txn(compare, [*ops, self._head()])
        except BaseException:
            for name, gen in written:
                self._forget(name, gen)
            raise
        if not ok:
            for name, gen in written:
                self._forget(name, gen)
            raise Conflict(", ".join(name for name, _ in written) or "a rule")
        return rev
