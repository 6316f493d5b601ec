"""HTTP hooks: client, per-tenant policy, limiter and breaker (protocol.md 4)."""
