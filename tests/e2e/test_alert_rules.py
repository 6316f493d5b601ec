"""The shipped alert rules read metrics the services really expose.

An alert on a misspelt or renamed metric never fires and never complains; this test
scrapes /metrics of a running gateway and backend (real Kafka and PostgreSQL) and checks
every metric name in deploy/prometheus/alerts.yml against what they declare.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.offline_stack import StackFactory, offline_stacks
from tests.support.kafka import KafkaBroker
from tests.support.postgres import PostgresDatabase

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
# Series suffixes Prometheus derives from one declared counter or histogram.
_SUFFIX = re.compile(r"_(total|bucket|sum|count)$")
_PROMQL_WORDS = {"sum", "max", "min", "avg", "by", "rate", "increase", "without", "on"}


@pytest.fixture
async def make_stack(
    kafka_broker: KafkaBroker, postgres_db: PostgresDatabase
) -> AsyncIterator[StackFactory]:
    async with offline_stacks(kafka_broker, postgres_db) as factory:
        yield factory


def alert_metrics() -> dict[str, str]:
    """metric name (as declared) -> the alert that reads it.

    The rules file is read line by line (`- alert:` then its `expr:`), which is all
    the structure it has; the project carries no YAML parser for one test."""
    found: dict[str, str] = {}
    alert = ""
    for line in ALERTS.read_text().splitlines():
        key, _, value = line.strip().removeprefix("- ").partition(":")
        if key == "alert":
            alert = value.strip()
        elif key == "expr":
            expr = re.sub(r"\{[^}]*\}|\[[^]]*\]", "", value)  # drop matchers, ranges
            expr = re.sub(r"\bby\s*\([^)]*\)", "", expr)  # and grouping labels
            for word in re.findall(r"[a-z_][a-z0-9_]*", expr):
                if word not in _PROMQL_WORDS:
                    found[_SUFFIX.sub("", word)] = alert
    return found


def declared(exposition: str) -> set[str]:
    """Names declared by `# TYPE` lines (counters are declared with their _total)."""
    lines = exposition.splitlines()
    return {_SUFFIX.sub("", line.split()[2]) for line in lines if line.startswith("# TYPE ")}


async def test_every_alert_reads_a_metric_a_service_declares(make_stack: StackFactory) -> None:
    stack = await make_stack()
    async with aiohttp.ClientSession() as http:
        texts = []
        for base in (stack.gateway.url, stack.backend.url):
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 200
                texts.append(await response.text())
    names = declared(texts[0]) | declared(texts[1])
    wanted = alert_metrics()
    assert len(wanted) >= 8, f"the rule parser found too little: {wanted}"
    missing = {name: alert for name, alert in wanted.items() if name not in names}
    assert not missing, f"alerts on metrics nobody exposes: {missing}"
