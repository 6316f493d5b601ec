"""asyncio client SDK for MICS gateways (client WebSocket, protocol.md sections 2 and 9)."""

from mics.client.backoff import Backoff, backoff_delay
from mics.client.client import ClientOptions, ClientStats, MicsClient, State
from mics.client.errors import (
    TERMINAL_CLOSE_CODES,
    AckTimeout,
    ConnectError,
    ConnectionLost,
    ConnectRejected,
    MicsClientError,
    NotConnected,
)

__all__ = [
    "TERMINAL_CLOSE_CODES",
    "AckTimeout",
    "Backoff",
    "ClientOptions",
    "ClientStats",
    "ConnectError",
    "ConnectRejected",
    "ConnectionLost",
    "MicsClient",
    "MicsClientError",
    "NotConnected",
    "State",
    "backoff_delay",
]
