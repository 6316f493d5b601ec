"""Replay protection lives in `mics.protocol.replay` (the gateway's nudge endpoint uses it
too); re-exported here for the backend's modules."""

from mics.protocol.replay import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_WINDOW_MS,
    REPLAYED,
    STALE,
    ReplayGuard,
    wall_clock_ms,
)

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_WINDOW_MS",
    "REPLAYED",
    "STALE",
    "ReplayGuard",
    "wall_clock_ms",
]
