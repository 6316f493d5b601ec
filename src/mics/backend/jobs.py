"""Operations jobs of the offline store (offline-design.md section 6).

* **Retention cleanup**: delete delivered rows created more than ``retention_days``
  (default 30) days ago, 10,000 rows per transaction, logging progress. Undelivered rows
  are never deleted.
* **Reconciliation**, per UTC day and tenant: the consumer counts, in the same
  transaction as the rows it stores, the signed OFFLINE_MESSAGE events it processed and
  what became of them (``offline_consume_stats``: consumed, stored, duplicate, filtered,
  invalid). Events that should have left a row are ``consumed - duplicate - filtered``;
  the job compares that with the rows of that day actually in ``offline_messages``
  (by ``created_at``, the event time). ``diff_ratio = |expected - rows| / max(expected,
  rows)``; above 1 % it logs an error line (``offline reconciliation mismatch``) and the
  gauge ``offline_message_reconcile_diff_ratio{tenant}`` shows the ratio. A mismatch
  means rows vanished (deleted undelivered, restored backup) or appeared outside the
  consumer. Reconcile days younger than the retention period: cleanup removes
  delivered rows of older days.

CLI entry points (``mics backend cleanup|reconcile``): :func:`run_cleanup` and
:func:`run_reconcile`. In a running backend :class:`PeriodicJobs` runs both every
``jobs_interval_seconds`` (reconciling each finished day once).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mics.backend.store.engine import Store
from mics.backend.store.repository import DEFAULT_CLEANUP_BATCH, OfflineRepository

if TYPE_CHECKING:
    from mics.backend.state import BackendMetrics

log = logging.getLogger("mics.backend.jobs")

DEFAULT_RETENTION_DAYS = 30
RECONCILE_THRESHOLD = 0.01
_MS_PER_DAY = 86_400_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def yesterday(now_ms: int | None = None) -> dt.date:
    now = _now_ms() if now_ms is None else now_ms
    return dt.datetime.fromtimestamp(now / 1000, tz=dt.UTC).date() - dt.timedelta(days=1)


def _as_date(day: dt.date | str | None) -> dt.date:
    if day is None:
        return yesterday()
    if isinstance(day, dt.date):
        return day
    return dt.date.fromisoformat(day)


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    day: str
    tenant_id: str
    consumed: int
    stored: int
    duplicate: int
    filtered: int
    invalid: int
    expected: int  # consumed - duplicate - filtered
    rows: int  # rows of that day in offline_messages
    diff_ratio: float
    alert: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def cleanup(
    repository: OfflineRepository,
    days: int = DEFAULT_RETENTION_DAYS,
    *,
    batch: int = DEFAULT_CLEANUP_BATCH,
    now_ms: int | None = None,
    metrics: BackendMetrics | None = None,
) -> int:
    """Delete delivered rows older than ``days`` days; returns how many."""
    if days < 1:
        raise ValueError("days must be at least 1")
    now = _now_ms() if now_ms is None else now_ms
    cutoff = now - days * _MS_PER_DAY
    started = time.perf_counter()
    deleted = await repository.delete_delivered_older_than(cutoff, batch=batch)
    if metrics is not None:
        metrics.cleanup_deleted.inc(deleted)
    log.info(
        "offline cleanup done",
        extra={
            "deleted": deleted,
            "retention_days": days,
            "cutoff_ms": cutoff,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return deleted


async def reconcile(
    repository: OfflineRepository,
    day: dt.date | str | None = None,
    *,
    threshold: float = RECONCILE_THRESHOLD,
    metrics: BackendMetrics | None = None,
) -> list[ReconcileResult]:
    """Reconcile one UTC day (default: yesterday), per tenant; see the module doc."""
    date = _as_date(day)
    stats = await repository.consume_stats(date)
    rows = await repository.count_stored_by_day(date)
    results = []
    for tenant_id in sorted(set(stats) | set(rows)):
        s = stats.get(tenant_id)
        consumed, stored, duplicate, filtered, invalid = (
            (s.consumed, s.stored, s.duplicate, s.filtered, s.invalid) if s else (0, 0, 0, 0, 0)
        )
        expected = consumed - duplicate - filtered
        present = rows.get(tenant_id, 0)
        ratio = abs(expected - present) / max(expected, present, 1)
        result = ReconcileResult(
            day=date.isoformat(),
            tenant_id=tenant_id,
            consumed=consumed,
            stored=stored,
            duplicate=duplicate,
            filtered=filtered,
            invalid=invalid,
            expected=expected,
            rows=present,
            diff_ratio=ratio,
            alert=ratio > threshold,
        )
        results.append(result)
        if metrics is not None:
            metrics.reconcile_diff_ratio.labels(tenant_id).set(ratio)
        if result.alert:
            log.error("offline reconciliation mismatch", extra=result.as_dict())
        else:
            log.info("offline reconciliation ok", extra=result.as_dict())
    return results


async def run_cleanup(
    url: str, days: int = DEFAULT_RETENTION_DAYS, *, batch: int = DEFAULT_CLEANUP_BATCH
) -> int:
    """``mics backend cleanup``: clean the database at ``url`` once; returns rows deleted."""
    store = Store(url, auto_migrate=False, pool_size=1)
    try:
        return await cleanup(await store.repository(), days, batch=batch)
    finally:
        await store.close()


async def run_reconcile(
    url: str, day: dt.date | str | None = None, *, threshold: float = RECONCILE_THRESHOLD
) -> list[ReconcileResult]:
    """``mics backend reconcile``: reconcile ``day`` (default yesterday, UTC) once.

    The caller decides what an alert means for its exit status (``any(r.alert ...)``).
    """
    store = Store(url, auto_migrate=False, pool_size=1)
    try:
        return await reconcile(await store.repository(), day, threshold=threshold)
    finally:
        await store.close()


class PeriodicJobs:
    """Cleanup every ``interval_s``, and reconciliation of each finished day once.

    Runs only against a store that is open: a backend whose (lazily opened) store was
    never used has nothing to clean.
    """

    def __init__(
        self,
        store: Store,
        metrics: BackendMetrics,
        *,
        interval_s: float,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._interval_s = interval_s
        self._retention_days = retention_days
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.last_reconciled: dt.date | None = None
        self.runs = 0

    def start(self) -> None:
        if self._interval_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run_once(self) -> None:
        """One round: cleanup, then reconcile the previous day if not done yet."""
        if not self._store.is_open:
            return
        repository = await self._store.repository()
        now = self._clock()
        await cleanup(repository, self._retention_days, now_ms=now, metrics=self._metrics)
        day = yesterday(now)
        if self.last_reconciled != day:
            await reconcile(repository, day, metrics=self._metrics)
            self.last_reconciled = day
        self.runs += 1

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.run_once()
            except Exception:
                log.exception("offline jobs failed; retrying at the next interval")
