"""The MICS gateway: WebSocket sessions, message pipeline, delivery, offline strategies."""
