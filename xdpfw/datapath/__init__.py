"""The typed datapath: load or adopt the program, attach it, change rules, read counters.

    with Datapath.open(DatapathConfig(bpffs_dir=Path("/sys/fs/bpf/xdpfw"))) as dp:
        dp.attach("veth0", mode="auto")
        dp.add_rule(RuleSpec.parse(src="198.18.0.0/15").with_id(1))
        print(dp.rule_counters())

`open` adopts the pinned program and maps when they exist (the ABI recorded in the config map
must match; the rules are read back from the maps); with nothing pinned, it re-pins and adopts
an xdpfw program still running on `cfg.interfaces` (recover.py), and otherwise loads and pins
a fresh program.
Either way the kernel keeps filtering when the process exits: only `close(cleanup=True)`
detaches and unpins. Rule changes are map updates, never a program reload, and a change is in
the maps when the call returns. Kernel failures leave as xdpfw.errors (KernelError carries the
errno), never as OSError.

The package: facade.py (Datapath, the face the service uses), pins.py (pin sets and the ABI
check), attach.py (netlink), writer.py (plans into the maps, rollback), sets.py (rule-set
ids), counters.py (counter indices and reads), d248.py (the IPv4 prefix arrays), adopt.py (reading
pinned maps back), recover.py (recognising an xdpfw program whose pins were lost, re-pinning
it), slots.py and keys.py (the byte forms of slots, entries and keys),
translate.py (kernel errors into xdpfw.errors).
"""

from __future__ import annotations

from xdpfw.datapath.attach import Attachment
from xdpfw.datapath.counters import COUNTER_QUARANTINE_S, GlobalCounters, RuleCounters
from xdpfw.datapath.facade import Datapath, DatapathConfig
from xdpfw.datapath.keys import decode_key, encode_key
from xdpfw.datapath.limits import Ban, LimitCounters
from xdpfw.datapath.pins import MAP_TYPES, PROG_PIN
from xdpfw.datapath.sets import SET_QUARANTINE_S

__all__ = [
    "COUNTER_QUARANTINE_S",
    "MAP_TYPES",
    "PROG_PIN",
    "SET_QUARANTINE_S",
    "Attachment",
    "Ban",
    "Datapath",
    "DatapathConfig",
    "GlobalCounters",
    "LimitCounters",
    "RuleCounters",
    "decode_key",
    "encode_key",
]
