"""Exceptions raised by the MICS client SDK."""

from __future__ import annotations

from mics.protocol.codec import CLOSE_AUTH_FAILED, CLOSE_INVALID_TENANT, CLOSE_REPLACED

# Close codes after which a client must not reconnect on its own (protocol.md 2.3, 9.9).
TERMINAL_CLOSE_CODES: frozenset[int] = frozenset(
    {CLOSE_AUTH_FAILED, CLOSE_INVALID_TENANT, CLOSE_REPLACED}
)


class MicsClientError(Exception):
    """Base class of every error this SDK raises."""


class ConnectError(MicsClientError):
    """The connection could not be established (network, timeout, HTTP status, protocol).

    ``status`` is the HTTP status when the upgrade was refused (e.g. 503 while draining).
    """

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class ConnectRejected(ConnectError):
    """The gateway closed the WebSocket before sending ``connect_ack``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection rejected: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason

    @property
    def terminal(self) -> bool:
        """True for 4001 / 4002 / 4409: reconnecting automatically is not allowed."""
        return self.code in TERMINAL_CLOSE_CODES


class ConnectionLost(MicsClientError):
    """The connection ended before the awaited result arrived.

    ``code``/``reason`` describe how the connection ended (1006 when no close frame was
    received). A send that fails this way may be retried with the same msg_id: the gateway
    deduplicates by (sender, msg_id).
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection lost: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class NotConnected(ConnectionLost):
    """An operation needed an open connection but the client is reconnecting or closed."""

    def __init__(self, state: str) -> None:
        super().__init__(None, f"not connected (state {state})")
        self.state = state


class AckTimeout(MicsClientError, TimeoutError):
    """No ``MessageAck`` for ``msg_id`` within ``timeout_s`` (a local FAILED ``ack timeout``)."""

    def __init__(self, msg_id: str, timeout_s: float) -> None:
        super().__init__(f"no ack for {msg_id} within {timeout_s:g}s")
        self.msg_id = msg_id
        self.timeout_s = timeout_s
