"""The service's log: a level on every line, text or one JSON object per line.

`configure(settings)` installs one handler on the root logger; uvicorn's loggers (started with
`log_config=None`) propagate to it, so every line, uvicorn's included, has the same shape:

    text: 2026-12-01 23:40:00,123 INFO xdpfw.audit change who=admin POST /v1/rules -> 201 ...
    json: {"ts": "2026-12-01T23:40:00.123+00:00", "level": "INFO", "logger": "xdpfw.audit",
           "msg": "...", "who": "admin", "method": "POST", "path": "/v1/rules", ...}

A record's `fields` extra (a dict, as api/audit.py passes) becomes top-level JSON members.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from api.settings import Settings

__all__ = ["TEXT_FORMAT", "JsonFormatter", "configure"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the record's `fields`, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(settings: Settings) -> None:
    """The root handler (stderr), its format and level; uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = not settings.access_log
