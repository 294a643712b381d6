"""Shared fixtures. Layers are pytest markers: pure, bpf, kernel, e2e (see pyproject.toml).

bpf/kernel/e2e tests need root; they are skipped (loudly) without it. Everything a test
creates in the kernel (pins, XDP attachments, namespaces, veths) has a unique name and is
removed by its fixture, also when the test fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from xdpfw.compiler import Capacities

if TYPE_CHECKING:
    from xdpfw.datapath import Datapath

IS_ROOT = os.geteuid() == 0
TEST_CAPS = Capacities(max_rules=8192, max_prefixes=4096, max_sets=512)
BPFFS = Path("/sys/fs/bpf")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (bpf/kernel/e2e layer)")
    for item in items:
        if any(item.get_closest_marker(m) for m in ("bpf", "kernel", "e2e")):
            item.add_marker(skip)


def unique_pin_dir(tag: str) -> Path:
    return BPFFS / f"xdpfw-test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def session_datapath() -> Iterator[Datapath]:
    from xdpfw.datapath import Datapath, DatapathConfig

    dp = Datapath.open(DatapathConfig(bpffs_dir=unique_pin_dir("session"), caps=TEST_CAPS))
    try:
        yield dp
    finally:
        dp.close(cleanup=True)


@pytest.fixture(scope="session")
def session_soak_datapath() -> Iterator[Datapath]:
    """A second program for the session, with the soak's capacities (thousands of nested
    prefixes, 65,536 rules): one compile shared by the modules that need room."""
    from xdpfw.datapath import Datapath, DatapathConfig
    from xdpfw.verify.soak import SOAK_CAPS

    dp = Datapath.open(DatapathConfig(bpffs_dir=unique_pin_dir("soak"), caps=SOAK_CAPS))
    try:
        yield dp
    finally:
        dp.close(cleanup=True)


@pytest.fixture
def soak_dp(session_soak_datapath: Datapath) -> Iterator[Datapath]:
    """The soak-capacity program with no rules; rules are removed after the test."""
    session_soak_datapath.remove_rules([r.id for r in session_soak_datapath.rules()])
    yield session_soak_datapath
    session_soak_datapath.remove_rules([r.id for r in session_soak_datapath.rules()])


@pytest.fixture
def dp(session_datapath: Datapath) -> Iterator[Datapath]:
    """The session's loaded program with no rules; rules are removed after the test."""
    session_datapath.remove_rules([r.id for r in session_datapath.rules()])
    yield session_datapath
    session_datapath.remove_rules([r.id for r in session_datapath.rules()])
    for att in session_datapath.attachments():
        session_datapath.detach(att.ifname)
