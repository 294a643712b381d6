"""What the service needs from a datapath: the one door between api/ and the kernel side.

`FirewallService` calls exactly these members on its datapath and nothing else. The real
`xdpfw.datapath.Datapath` satisfies them (mypy checks it where the server builds the service);
tests/fakes.py has an in-memory stand-in, so the API can be tested without root or bcc.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from xdpfw.datapath import Attachment, GlobalCounters, RuleCounters
from xdpfw.rules import Rule
from xdpfw.xray.hub import SampleSource

__all__ = ["CounterArrays", "DatapathPort", "RuleIndex"]

CounterArrays = tuple[
    np.ndarray[Any, np.dtype[np.uint32]],  # rule ids
    np.ndarray[Any, np.dtype[np.uint64]],  # packets
    np.ndarray[Any, np.dtype[np.uint64]],  # bytes
    np.ndarray[Any, np.dtype[np.uint64]],  # last hit, ns (0: never)
]


class RuleIndex(Protocol):
    """The rules in the maps, as the compiler knows them (read only)."""

    @property
    def rules(self) -> Mapping[int, Rule]: ...

    def codes(self) -> Mapping[int, int]: ...

    def find_code(self, code: int) -> int | None: ...

    def find_duplicate(self, rule: Rule) -> int | None: ...

    def __len__(self) -> int: ...


class DatapathPort(Protocol):
    """The loaded program and its maps, as the service uses them."""

    @property
    def prog_id(self) -> int: ...

    @property
    def adopted(self) -> bool: ...

    @property
    def compiler(self) -> RuleIndex: ...

    # rules: all or nothing, in the maps when the call returns
    def add_rules(self, rules: Sequence[Rule]) -> None: ...

    def remove_rules(self, rule_ids: Iterable[int]) -> list[Rule]: ...

    # counters
    def rule_counters(self, rule_ids: Iterable[int] | None = None) -> dict[int, RuleCounters]: ...

    def top_counters(self, n: int | None = None) -> list[tuple[int, RuleCounters]]: ...

    def counter_arrays(self) -> CounterArrays: ...

    def global_counters(self) -> GlobalCounters: ...

    def table_usage(self) -> dict[str, tuple[int, int]]: ...

    # interfaces
    def attach(self, ifname: str, mode: str = "auto") -> Attachment: ...

    def detach(self, ifname: str) -> None: ...

    def attachments(self) -> list[Attachment]: ...

    # X-ray (issue 17): sampling is a map write
    def sample_configure(self, max_pps: int, snaplen: int) -> None: ...

    def sample_set(self, every: dict[int, int | None]) -> None: ...

    def sample_rules(self) -> dict[int, int]: ...

    def sample_settings(self) -> tuple[int, int]: ...

    def sample_stats(self) -> dict[str, int]: ...

    def sample_ring(self) -> SampleSource: ...


if TYPE_CHECKING:
    from xdpfw.datapath import Datapath

    def _the_real_datapath_fits(dp: Datapath) -> DatapathPort:  # checked by mypy, never run
        return dp
