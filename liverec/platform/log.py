"""Structured logging: one JSON object per line, so logs from every process can be joined by field."""

from __future__ import annotations

import json
import logging
import sys
import time

from liverec.platform.config import LoggingConfig

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Render a record and its `extra=` fields as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(config: LoggingConfig, stream=sys.stderr) -> None:
    """Install one handler on the root logger (idempotent: replaces a previous liverec handler)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_liverec", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler._liverec = True  # type: ignore[attr-defined]
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(config.level)
    # kafka-python logs every reconnect at INFO/WARNING; keep it to real problems.
    logging.getLogger("kafka").setLevel(max(logging.ERROR, root.level))
