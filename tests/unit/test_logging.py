"""Structured logs: one JSON object per line with tenant, node, trace and msg ids."""

from __future__ import annotations

import io
import json
import logging

from mics.observability.logging import log_context, setup_logging


def test_log_lines_are_json_with_context_ids() -> None:
    stream = io.StringIO()
    setup_logging("INFO", stream)
    try:
        logger = logging.getLogger("mics.test")
        with log_context(tenant="t1", node="n1", trace="tr1"):
            logger.info("delivered", extra={"msg_id": "m1", "count": 2})
        logger.info("outside")
    finally:
        setup_logging("WARNING")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "delivered"
    assert (first["tenant"], first["node"], first["trace_id"], first["msg_id"]) == (
        "t1",
        "n1",
        "tr1",
        "m1",
    )
    assert first["count"] == 2
    assert first["level"] == "info"
    assert "tenant" not in second


def test_exceptions_are_logged_as_a_field() -> None:
    stream = io.StringIO()
    setup_logging("INFO", stream)
    try:
        try:
            raise ValueError("bad")
        except ValueError:
            logging.getLogger("mics.test").exception("failed")
    finally:
        setup_logging("WARNING")
    entry = json.loads(stream.getvalue())
    assert "ValueError: bad" in entry["exc"]
