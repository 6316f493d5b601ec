"""Structured JSON logs carrying tenant, node, trace and msg ids.

Ids travel in context variables so that any log line written while handling a
connection or a message carries them without threading them through every call.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")
trace_var: contextvars.ContextVar[str] = contextvars.ContextVar("trace", default="")
msg_var: contextvars.ContextVar[str] = contextvars.ContextVar("msg", default="")
node_var: contextvars.ContextVar[str] = contextvars.ContextVar("node", default="")

_CONTEXT = (
    ("tenant", tenant_var),
    ("node", node_var),
    ("trace_id", trace_var),
    ("msg_id", msg_var),
)
_VARS = {"tenant": tenant_var, "trace": trace_var, "msg": msg_var, "node": node_var}
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, var in _CONTEXT:
            value = var.get()
            if value:
                entry[key] = value
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per HTTP request; the gateway logs what matters.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@contextmanager
def log_context(**ids: str) -> Iterator[None]:
    """Bind ids (tenant, trace, msg, node) for the duration of a block."""
    tokens = []
    for key, value in ids.items():
        var = _VARS[key]
        tokens.append((var, var.set(value)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def bind_log_context(**ids: str) -> None:
    """Bind ids for the rest of the current task (each task has its own context copy).

    Cheaper than `log_context` for a task that lives as long as what it logs about,
    such as a connection handler: no tokens to keep, nothing to reset.
    """
    for key, value in ids.items():
        _VARS[key].set(value)


def now_ms() -> int:
    return time.time_ns() // 1_000_000
