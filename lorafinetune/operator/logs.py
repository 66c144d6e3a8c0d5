"""The operator's log lines: text for people (the default), or one JSON object a line for log pipelines
(LFT_LOG_FORMAT=json), with the fine-tune's namespace, name and reason as fields of their own."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Literal, get_args

# Fields a log call may pass with `extra=`; kept as JSON keys of their own (a log query can filter on them).
FIELDS = ("namespace", "finetune", "reason")
LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)


def parse_format(value: str) -> LogFormat:
    for known in FORMATS:
        if value == known:
            return known
    raise ValueError(f"LFT_LOG_FORMAT must be one of {', '.join(FORMATS)}, got {value!r}")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: getattr(record, key) for key in FIELDS if hasattr(record, key)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    # One line per transition and per error (handlers.log), with namespace/name. kopf's own INFO lines ("handler
    # succeeded" for every resource on every change) would bury them, so kopf logs warnings and errors only.
    logging.getLogger("kopf").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # a line per liveness probe otherwise
