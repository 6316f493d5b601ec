"""HTTP hook client: signed protobuf POSTs with per-(tenant, hook) limits (protocol.md 4).

One ``aiohttp.ClientSession`` serves every tenant. Each (tenant, hook) pair owns a
``ConcurrencyLimiter`` and a ``CircuitBreaker`` plus pre-bound metric children, so the
hot path (``/check-message`` runs for every message) does a dict lookup, an HMAC, one
HTTP exchange and a few counter increments, and logs nothing.

Order of a call: breaker -> sign-required check -> slot wait (``queue_timeout_ms``)
-> fill meta, sign, serialize -> POST under ``timeout_ms`` (send and full body read).
Hook failures never raise; they come back as a ``HookOutcome``. Cancellation of the
caller is counted as ``canceled`` and re-raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Generic, TypeVar

import aiohttp
from google.protobuf.message import Message
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from yarl import URL

from mics.hooks.breaker import BreakerState, CircuitBreaker
from mics.hooks.limiter import ConcurrencyLimiter
from mics.hooks.policy import HookDefaults, HookPolicy, resolve_policy
from mics.observability.metrics import MetricsRegistry
from mics.protocol.ids import new_request_id
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.signing import SignedRequest, sign_hook_request

__all__ = [
    "HOOK_PATHS",
    "HookClient",
    "HookOp",
    "HookOutcome",
    "HookResult",
]

R = TypeVar("R", bound=Message)

_log = logging.getLogger("mics.hooks")

# At most one failure warning per (tenant, hook) per interval; the rest are counted.
_LOG_INTERVAL_S = 1.0
_KEEPALIVE_S = 30.0
_HEADERS: Mapping[str, str] = MappingProxyType({"Content-Type": "application/protobuf"})


class HookOp(StrEnum):
    AUTH = "Auth"
    CHECK_MESSAGE = "CheckMessage"
    GET_GROUP_MEMBERS = "GetGroupMembers"
    GET_OFFLINE_MESSAGES = "GetOfflineMessages"
    ACK_OFFLINE_MESSAGES = "AckOfflineMessages"


HOOK_PATHS: dict[HookOp, str] = {
    HookOp.AUTH: "/auth",
    HookOp.CHECK_MESSAGE: "/check-message",
    HookOp.GET_GROUP_MEMBERS: "/get-group-members",
    HookOp.GET_OFFLINE_MESSAGES: "/get-offline-messages",
    HookOp.ACK_OFFLINE_MESSAGES: "/ack-offline-messages",
}


class HookResult(StrEnum):
    OK = "ok"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    HTTP_OTHER = "http_other"
    DECODE_ERROR = "decode_error"
    NETWORK_ERROR = "network_error"
    TIMEOUT = "timeout"
    QUEUE_REJECTED = "queue_rejected"
    CANCELED = "canceled"
    CIRCUIT_OPEN = "circuit_open"
    SIGN_REQUIRED = "sign_required"


@dataclass(slots=True)
class HookOutcome(Generic[R]):
    """What a hook call produced. ``duration_ms`` is the HTTP exchange (0 if none)."""

    result: HookResult
    response: R | None
    http_status: int = 0
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.result is HookResult.OK


class _SumCell:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class _DurationSumCollector(Collector):
    """``mics_hook_duration_ms_total{tenant,op}``: the sum of hook call durations.

    Its family name equals the histogram ``mics_hook_duration_ms``, which a registered
    ``Counter`` would clash with; the exposed sample names differ (``_total`` versus
    ``_bucket``/``_sum``/``_count``), so this collector describes no names and emits
    no ``_created`` sample.
    """

    def __init__(self) -> None:
        self._cells: dict[tuple[str, str], _SumCell] = {}

    def cell(self, tenant_id: str, op: str) -> _SumCell:
        key = (tenant_id, op)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = _SumCell()
        return cell

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "mics_hook_duration_ms",
            "Sum of hook call durations in milliseconds.",
            labels=("tenant", "op"),
        )
        for (tenant_id, op), cell in list(self._cells.items()):
            family.add_metric((tenant_id, op), cell.value)
        return (family,)


class _HookState:
    """Limiter, breaker, metric children and log throttle of one (tenant, hook)."""

    __slots__ = (
        "base_url",
        "breaker",
        "duration_hist",
        "duration_sum",
        "limiter",
        "log_next",
        "log_suppressed",
        "op",
        "path",
        "policy",
        "rejected",
        "results",
        "tenant_id",
        "url",
    )

    def __init__(
        self,
        tenant_id: str,
        op: HookOp,
        policy: HookPolicy,
        requests: Counter,
        duration_hist: Histogram,
        duration_sum: _SumCell,
        rejected: Counter,
    ) -> None:
        self.tenant_id = tenant_id
        self.op = op
        self.path = HOOK_PATHS[op]
        self.policy = policy
        self.limiter = ConcurrencyLimiter(policy.max_concurrency)
        self.breaker = CircuitBreaker(policy.breaker_failure_threshold, policy.breaker_open_ms)
        self.results = {r: requests.labels(tenant_id, op.value, r.value) for r in HookResult}
        self.duration_hist = duration_hist.labels(tenant_id, op.value)
        self.duration_sum = duration_sum
        self.rejected = rejected.labels(tenant_id, op.value, "queue_timeout")
        self.base_url = ""
        self.url: URL | None = None
        self.log_next = 0.0
        self.log_suppressed = 0

    def apply(self, policy: HookPolicy) -> None:
        if policy != self.policy:
            self.limiter.resize(policy.max_concurrency)
            self.breaker.reconfigure(policy.breaker_failure_threshold, policy.breaker_open_ms)
        self.policy = policy

    def url_for(self, base_url: str) -> URL:
        url = self.url
        if url is None or base_url != self.base_url:
            url = URL(base_url.rstrip("/") + self.path)
            self.url = url
            self.base_url = base_url
        return url


class HookClient:
    """Calls the tenant hooks; one instance per gateway, shared by all sessions."""

    def __init__(self, metrics: MetricsRegistry, defaults: HookDefaults) -> None:
        self._defaults = defaults
        self._session: aiohttp.ClientSession | None = None
        self._states: dict[tuple[str, HookOp], _HookState] = {}
        self._policies: dict[str, HookPolicy] = {}
        self._requests = metrics.counter(
            "mics_hook_requests",
            "Hook calls by result (protocol.md 4.2).",
            ("tenant", "op", "result"),
        )
        self._duration_hist = metrics.histogram_ms(
            "mics_hook_duration_ms",
            "Hook HTTP exchange duration in milliseconds.",
            ("tenant", "op"),
        )
        self._rejected = metrics.counter(
            "mics_hook_limiter_rejected",
            "Hook calls rejected by the per-(tenant, hook) concurrency limiter.",
            ("tenant", "op", "reason"),
        )
        self._duration_sum = _DurationSumCollector()
        metrics.registry.register(self._duration_sum)

    @property
    def defaults(self) -> HookDefaults:
        return self._defaults

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_S)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Each call runs under its own asyncio.timeout (policy.timeout_ms).
            timeout=aiohttp.ClientTimeout(total=None),
            # Hooks of different tenants may share a host: never carry cookies over.
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def policy_for(
        self, tenant_id: str, runtime_config: hook_pb.TenantRuntimeConfig | None
    ) -> HookPolicy:
        """Resolve the tenant's policy and apply it to its existing limiters/breakers.

        While the settings are unchanged the same object is returned, which keeps the
        per-call policy check in ``call`` an identity test.
        """
        policy = resolve_policy(self._defaults, tenant_id, runtime_config)
        cached = self._policies.get(tenant_id)
        if cached == policy:
            return cached
        self._policies[tenant_id] = policy
        for op in HookOp:
            state = self._states.get((tenant_id, op))
            if state is not None:
                state.apply(policy)
        return policy

    def breaker_state(self, tenant_id: str, op: HookOp) -> BreakerState:
        """State of one (tenant, hook) breaker; "closed" if it was never used."""
        state = self._states.get((tenant_id, op))
        return "closed" if state is None else state.breaker.state

    def _state(self, tenant_id: str, op: HookOp, policy: HookPolicy) -> _HookState:
        state = self._states.get((tenant_id, op))
        if state is None:
            state = _HookState(
                tenant_id,
                op,
                policy,
                self._requests,
                self._duration_hist,
                self._duration_sum.cell(tenant_id, op.value),
                self._rejected,
            )
            self._states[(tenant_id, op)] = state
        elif state.policy is not policy:
            state.apply(policy)
        return state

    async def call(
        self,
        *,
        tenant_id: str,
        op: HookOp,
        base_url: str,
        request: SignedRequest,
        response_type: type[R],
        secret: str,
        policy: HookPolicy,
        trace_id: str = "",
        benign_statuses: frozenset[int] = frozenset(),
    ) -> HookOutcome[R]:
        """One hook call; never raises for hook failures (see HookResult).

        ``benign_statuses`` are HTTP statuses that answer a question rather than signal a
        sick backend (a 404 from /ack-offline-messages means a v1 backend): they come
        back as failures to the caller but count as a live backend for the breaker.
        """
        session = self._session
        if session is None:
            raise RuntimeError("HookClient.start() has not been called")
        state = self._state(tenant_id, op, policy)
        breaker = state.breaker

        if not breaker.allow():
            return self._failed(state, HookResult.CIRCUIT_OPEN)
        # allow() succeeded: a non-closed breaker means this call holds the probe.
        probe = breaker.state != "closed"

        if not secret and policy.sign_required:
            return self._failed(state, HookResult.SIGN_REQUIRED, breaker_failure=True)

        limiter = state.limiter
        if not limiter.try_acquire():
            try:
                acquired = await limiter.acquire(policy.queue_timeout_ms / 1000.0)
            except asyncio.CancelledError:
                self._canceled(state, probe)
                raise
            if not acquired:
                if probe:
                    breaker.release_probe()
                state.rejected.inc()
                return self._failed(state, HookResult.QUEUE_REJECTED)

        try:
            meta = request.meta
            meta.tenant_id = tenant_id
            meta.request_id = new_request_id()
            meta.timestamp_ms = time.time_ns() // 1_000_000
            meta.trace_id = trace_id
            sign_hook_request(request, secret)
            body = request.SerializeToString()
        except BaseException:  # a malformed request is a caller bug: free what we hold
            limiter.release()
            if probe:
                breaker.release_probe()
            raise

        try:
            status = 0
            payload = b""
            error: BaseException | None = None
            started = time.perf_counter()
            try:
                async with asyncio.timeout(policy.timeout_ms / 1000.0):
                    async with session.post(
                        state.url_for(base_url),
                        data=body,
                        headers=_HEADERS,
                        allow_redirects=False,  # a 3xx is a result (http_other)
                    ) as resp:
                        status = resp.status
                        # Read the body even on errors so the connection can be reused.
                        payload = await resp.read()
            except asyncio.CancelledError:
                self._canceled(state, probe)
                raise
            except TimeoutError:
                result = HookResult.TIMEOUT
            except Exception as exc:  # transport errors, invalid URLs, anything else
                result = HookResult.NETWORK_ERROR
                error = exc
            else:
                result = HookResult.OK
            duration_ms = (time.perf_counter() - started) * 1000.0
        finally:
            limiter.release()

        state.duration_hist.observe(duration_ms)
        state.duration_sum.value += duration_ms

        if result is HookResult.OK:
            if 200 <= status < 300:
                response = response_type()
                try:
                    response.ParseFromString(payload)
                except Exception as exc:  # DecodeError, and others for some inputs
                    result = HookResult.DECODE_ERROR
                    error = exc
                else:
                    breaker.record_success()
                    state.results[HookResult.OK].inc()
                    return HookOutcome(HookResult.OK, response, status, duration_ms)
            else:
                result = _status_result(status)
                if status in benign_statuses:
                    breaker.record_success()
                    state.results[result].inc()
                    return HookOutcome(result, None, status, duration_ms)
        return self._failed(
            state,
            result,
            breaker_failure=True,
            http_status=status,
            duration_ms=duration_ms,
            error=error,
        )

    def _canceled(self, state: _HookState, probe: bool) -> None:
        if probe:
            state.breaker.release_probe()
        state.results[HookResult.CANCELED].inc()

    def _failed(
        self,
        state: _HookState,
        result: HookResult,
        *,
        breaker_failure: bool = False,
        http_status: int = 0,
        duration_ms: float = 0.0,
        error: BaseException | None = None,
    ) -> HookOutcome[R]:
        opened = False
        if breaker_failure:
            breaker = state.breaker
            was_open = breaker.state == "open"
            breaker.record_failure()
            opened = not was_open and breaker.state == "open"
        state.results[result].inc()
        self._log_failure(state, result, http_status, error, opened)
        return HookOutcome(result, None, http_status, duration_ms)

    def _log_failure(
        self,
        state: _HookState,
        result: HookResult,
        http_status: int,
        error: BaseException | None,
        opened: bool,
    ) -> None:
        now = time.monotonic()
        if now < state.log_next and not opened:
            state.log_suppressed += 1
            return
        state.log_next = now + _LOG_INTERVAL_S
        suppressed, state.log_suppressed = state.log_suppressed, 0
        detail = f": {type(error).__name__}: {error}" if error is not None else ""
        _log.warning(
            "hook %s for tenant %s failed: %s%s%s",
            state.op.value,
            state.tenant_id,
            result.value,
            detail,
            " (breaker opened)" if opened else "",
            extra={
                "tenant": state.tenant_id,
                "op": state.op.value,
                "result": result.value,
                "http_status": http_status,
                "breaker": state.breaker.state,
                "suppressed": suppressed,
            },
        )


def _status_result(status: int) -> HookResult:
    if 400 <= status < 500:
        return HookResult.HTTP_4XX
    if 500 <= status < 600:
        return HookResult.HTTP_5XX
    return HookResult.HTTP_OTHER
