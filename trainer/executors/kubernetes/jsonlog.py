"""JSON-lines logging for the controller (one object per line on stderr, fields merged in)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# --------------------------------------------------------------------------------------------- logging

logger = logging.getLogger("trainer.controller")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg and the record's structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log(level: str, msg: str, **fields_: Any) -> None:
    logger.log(logging.getLevelNamesMapping()[level.upper()], msg, extra={"fields": fields_}, stacklevel=2)


def setup_json_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("kubernetes", "urllib3"):  # their DEBUG output is whole response bodies
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
