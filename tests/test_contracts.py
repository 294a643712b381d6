"""Shapes that cross a boundary are derived or checked, not trusted (pure: no root, no bcc).

- The global counters: `abi.Stat` (checked against bpf/xdpfw_abi.h by tests/test_abi.py) is
  the one list; every copy above it (TotalsOut, client.Totals, GlobalCounters, the model's
  Outcome, the /metrics labels, the CLI's columns) has the same names in the same order.
- The CLI's view of the API (xdpfw/cli/client.py TypedDicts) against the API's own OpenAPI
  schema: a field added to (or removed from) a response model fails here until the client
  follows.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, cast, get_args, get_origin, get_type_hints

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from api import metrics as metrics_mod
from api.app import create_app
from api.models import TotalsOut
from api.settings import get_settings
from xdpfw import abi
from xdpfw.cli import client, stats, top
from xdpfw.datapath import GlobalCounters
from xdpfw.verify.model import Outcome

pytestmark = pytest.mark.pure

NAMES = [stat.field for stat in abi.Stat.counters()]

# --- the global counters ---------------------------------------------------------------------


def test_the_one_list() -> None:
    assert abi.Stat.counters() == tuple(s for s in abi.Stat if s < abi.Stat.MAX)
    # The JSON names of today's API: renaming a Stat member must not rename them silently.
    assert NAMES == [
        "packets", "passed", "dropped", "monitored", "malformed", "non_ip", "fragments", "bytes"
    ]


def test_totals_out_and_client_totals_have_every_counter_in_order() -> None:
    assert list(TotalsOut.model_fields) == NAMES
    assert list(client.Totals.__annotations__) == NAMES
    g = GlobalCounters(*range(1, len(NAMES) + 1))
    assert TotalsOut.of(g).model_dump() == {n: i for i, n in enumerate(NAMES, 1)}


def test_global_counters_and_model_outcome_name_every_counter() -> None:
    assert [f.name for f in dataclasses.fields(GlobalCounters)] == NAMES
    # Outcome's order is the dataclass's (bytes has no default, so it comes first).
    assert set(NAMES) <= {f.name for f in dataclasses.fields(Outcome)}
    o = Outcome(action="pass", rule_id=None, verdict=0, bytes=60, passed=1, fragments=1)
    assert o.stats() == {
        abi.Stat.PACKETS: 1, abi.Stat.PASSED: 1, abi.Stat.DROPPED: 0, abi.Stat.MONITORED: 0,
        abi.Stat.MALFORMED: 0, abi.Stat.NON_IP: 0, abi.Stat.FRAGMENTS: 1, abi.Stat.BYTES: 60,
    }


class _Svc:
    def totals(self) -> GlobalCounters:
        return GlobalCounters(*range(1, len(NAMES) + 1))


class _Frames:
    def __init__(self, collector: metrics_mod._Collector) -> None:
        self.collector = collector

    def collect(self) -> Any:
        return self.collector.frames()

    def sample_stats(self) -> dict[str, int]:
        return {"sent": 9, "lost_ring": 10, "lost_cap": 11, "lost_client": 12}


def test_metrics_frame_labels_come_from_the_list() -> None:
    """The verdicts partition the frames (pass + drop = packets), the flags are every other
    counter but bytes, named by abi.Stat, in its order (README "upgrade notes": they replaced
    xdpfw_packets_total{outcome})."""
    assert {metrics_mod.VERDICTS["pass"], metrics_mod.VERDICTS["drop"]} == {
        abi.Stat.PASSED, abi.Stat.DROPPED}
    assert [s.field for s in metrics_mod.FLAGS] == ["monitored", "malformed", "non_ip",
                                                     "fragments"]
    collector = metrics_mod._Collector(cast(Any, _Svc()), metrics_mod.SourceCounters())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Frames(collector))
    text = generate_latest(registry).decode()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples == [
        'xdpfw_frames_total{verdict="pass"} 2.0',
        'xdpfw_frames_total{verdict="drop"} 3.0',
        'xdpfw_frames_flagged_total{flag="monitored"} 4.0',
        'xdpfw_frames_flagged_total{flag="malformed"} 5.0',
        'xdpfw_frames_flagged_total{flag="non_ip"} 6.0',
        'xdpfw_frames_flagged_total{flag="fragments"} 7.0',
        "xdpfw_bytes_total 8.0",
    ]


def test_cli_columns_come_from_the_list() -> None:
    assert list(stats.TOTALS) == NAMES
    assert set(stats.TOTAL_LABELS) <= set(NAMES)
    assert set(top.TOP_LINE) <= set(NAMES)


# --- the client's types against the OpenAPI schema --------------------------------------------

# client TypedDict -> the API's schema component. Every response component must be here.
PAIRS: dict[type, str] = {
    client.Rule: "RuleOut",
    client.RuleCounters: "RuleCountersOut",
    client.RulePage: "RulePage",
    client.BulkResult: "BulkOut",
    client.Totals: "TotalsOut",
    client.RuleStat: "RuleStatOut",
    client.Stats: "StatsOut",
    client.Interface: "InterfaceOut",
    client.Problem: "Problem",
    client.FieldError: "FieldError",
    client.TableUsage: "TableUsage",
    client.Health: "HealthOut",
    client.CrowdsecHealth: "CrowdsecHealthOut",  # issue 14: CrowdSec
    # issue 13: sources
    client.Source: "SourceOut",
    client.SourceDetail: "SourceDetailOut",
    client.SourceChange: "SourceChangeOut",
    client.Removed: "RemovedOut",
    client.Sample: "SampleOut",  # X-ray
    client.SampleStats: "SamplesOut",
}
# Components the client does not mirror as a TypedDict: request bodies (the CLI builds them
# as dicts and the API validates them) and error bodies (client.error_for reads them loosely).
NOT_MIRRORED = {
    "RuleIn", "SampleIn", "InterfaceIn", "ErrorOut", "HTTPValidationError", "ValidationError"
}


@pytest.fixture(scope="module")
def components() -> dict[str, Any]:
    # Building the schema never calls the service: no datapath, no root.
    app = create_app(get_settings(), cast(Any, None), "token")
    return cast(dict[str, Any], app.openapi()["components"]["schemas"])


def _schema_type(s: dict[str, Any]) -> str:
    """A JSON schema -> the Python annotation the client should use, as text."""
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[1]
        by_component = {v: k.__name__ for k, v in PAIRS.items()}
        return by_component.get(name, f"<unmirrored {name}>")
    if "anyOf" in s:
        return " | ".join(_schema_type(a) for a in s["anyOf"])
    t = s.get("type")
    if t == "array":
        return f"list[{_schema_type(s['items'])}]"
    if t == "object" and "additionalProperties" in s:
        return f"dict[str, {_schema_type(s['additionalProperties'])}]"
    simple = {"integer": "int", "string": "str", "boolean": "bool", "number": "float",
              "null": "None"}
    return simple.get(str(t), f"<{t}>")


def _py_type(t: Any) -> str:
    """A client annotation -> the same text as _schema_type."""
    if t is type(None):
        return "None"
    if isinstance(t, types.UnionType) or get_origin(t) is typing.Union:
        return " | ".join(_py_type(a) for a in get_args(t))
    origin = get_origin(t)
    if origin is list:
        return f"list[{_py_type(get_args(t)[0])}]"
    if origin is dict:
        key, value = get_args(t)
        return f"dict[{_py_type(key)}, {_py_type(value)}]"
    return str(t.__name__)


def test_every_response_component_has_a_client_type(components: dict[str, Any]) -> None:
    assert set(components) - NOT_MIRRORED == set(PAIRS.values())


@pytest.mark.parametrize("shape", list(PAIRS), ids=lambda t: t.__name__)
def test_client_type_matches_the_schema(shape: type, components: dict[str, Any]) -> None:
    schema = components[PAIRS[shape]]
    want = {name: _schema_type(prop) for name, prop in schema["properties"].items()}
    have = {name: _py_type(t) for name, t in get_type_hints(shape).items()}
    assert have == want, f"client.{shape.__name__} vs {PAIRS[shape]}"


def test_the_check_sees_a_missing_field(components: dict[str, Any]) -> None:
    """The comparison itself: a field the API has and the client lacks is a difference."""
    schema = dict(components["HealthOut"])
    schema["properties"] = {**schema["properties"], "uptime": {"type": "integer"}}
    want = {name: _schema_type(prop) for name, prop in schema["properties"].items()}
    have = {name: _py_type(t) for name, t in get_type_hints(client.Health).items()}
    assert set(want) - set(have) == {"uptime"}
