"""The gateway's Prometheus metrics, named as in protocol.md section 10."""

from __future__ import annotations

from mics.observability.metrics import MetricsRegistry


class GatewayMetrics:
    def __init__(self, registry: MetricsRegistry) -> None:
        r = registry
        self.registry = registry
        # prometheus_client appends _total to counters; names below are the exposed stems.
        self.ws_connections = r.gauge("mics_ws_connections", "Open WebSocket sessions", ("node",))
        self.ws_connection_events = r.counter(
            "mics_ws_connections_events", "Session count changes", ("tenant", "node", "delta")
        )
        self.ws_connected = r.counter("mics_ws_connected", "Sessions connected", ("tenant", "node"))
        self.ws_disconnected = r.counter(
            "mics_ws_disconnected", "Sessions disconnected", ("tenant", "node")
        )
        self.ws_connect_rejected = r.counter(
            "mics_ws_connect_rejected", "Connections refused before ConnectAck", ("tenant", "code")
        )
        self.ws_heartbeat_timeouts = r.counter(
            "mics_ws_heartbeat_timeouts", "Sessions closed for heartbeat timeout", ("tenant",)
        )
        self.ws_frames_rejected = r.counter(
            "mics_ws_frames_rejected", "Client frames rejected", ("tenant", "reason")
        )
        self.ws_takeovers = r.counter(
            "mics_ws_takeovers",
            "Sessions replaced by the same device connecting again",
            ("tenant",),
        )
        self.ws_slow_consumers = r.counter(
            "mics_ws_slow_consumer_closed", "Sessions closed for not reading", ("tenant",)
        )
        self.rate_limited = r.counter("mics_rate_limited", "Rate limit denials", ("tenant", "kind"))
        self.messages_in = r.counter("mics_messages_in", "Messages received", ("tenant", "type"))
        self.messages_rejected = r.counter(
            "mics_messages_rejected", "Messages acked FAILED before delivery", ("tenant", "reason")
        )
        self.messages_failed = r.counter(
            "mics_messages_failed", "Messages acked FAILED", ("tenant",)
        )
        self.dedup_hits = r.counter("mics_dedup_hits", "Duplicate msg_ids", ("tenant",))
        self.deliveries = r.counter("mics_deliveries", "Deliveries written", ("tenant", "via"))
        self.group_messages = r.counter("mics_group_messages", "Group messages", ("tenant",))
        self.group_members = r.counter("mics_group_members", "Group members resolved", ("tenant",))
        self.group_members_over_limit = r.counter(
            "mics_group_members_over_limit", "Groups over GROUP_MEMBERS_MAX_USERS", ("tenant",)
        )
        self.group_fanout_nodes = r.counter(
            "mics_group_fanout_nodes", "Peer nodes a group message was forwarded to", ("tenant",)
        )
        self.group_offline_notified = r.counter(
            "mics_group_offline_notified", "Offline group members notified", ("tenant",)
        )
        self.group_offline_buffered = r.counter(
            "mics_group_offline_buffered", "Offline group members buffered", ("tenant",)
        )
        self.group_offline_buffer_skipped = r.counter(
            "mics_group_offline_buffer_skipped", "Offline group members skipped", ("tenant",)
        )
        self.offline_notified = r.counter(
            "mics_offline_notified", "Single-chat OFFLINE_MESSAGE events enqueued", ("tenant",)
        )
        # Sub-millisecond buckets: a healthy broker confirms in about one linger.ms plus
        # a round trip; the top ones show acks nearing OFFLINE_NOTIFY_WAIT_MS.
        self.offline_notify_wait = r.histogram_ms(
            "mics_offline_notify_wait_ms",
            "How long the sender's ack waited for the broker to confirm an OFFLINE_MESSAGE "
            "(all tenants: they share the producer)",
            buckets=(0.5, 1, 1.5, 2, 3, 5, 10, 25, 50, 100, 200, 500, 1000),
        )
        self.offline_buffered = r.counter(
            "mics_offline_buffered", "Messages put in the in-memory buffer", ("tenant", "via")
        )
        self.offline_requeued = r.counter(
            "mics_offline_requeued",
            "Unconfirmed deliveries handed back to the offline path when their connection "
            "ended, by outcome (notified, buffered, lost)",
            ("tenant", "result"),
        )
        self.unconfirmed_forgotten = r.counter(
            "mics_unconfirmed_forgotten",
            "Deliveries no longer tracked for a receipt (the per-connection cap was reached)",
            ("tenant",),
        )
        self.offline_buffer_skipped = r.counter(
            "mics_offline_buffer_skipped", "Messages the buffer refused", ("tenant", "via")
        )
        self.offline_buffer_evicted = r.counter(
            "mics_offline_buffer_evicted", "Buffered messages evicted to make room", ("tenant",)
        )
        self.offline_buffer_evicted_users = r.counter(
            "mics_offline_buffer_evicted_users", "Users' buffers evicted (LRU)", ("tenant",)
        )
        self.offline_buffer_messages = r.gauge(
            "mics_offline_buffer_messages", "Messages held in the in-memory buffer"
        )
        self.offline_buffer_bytes = r.gauge(
            "mics_offline_buffer_bytes", "Bytes held in the in-memory buffer"
        )
        self.offline_drained = r.counter(
            "mics_offline_drained", "Buffered messages drained on connect", ("tenant", "node")
        )
        self.hook_check_message = r.counter(
            "mics_hook_check_message", "check-message verdicts", ("tenant", "result")
        )
        self.hook_get_group_members = r.counter(
            "mics_hook_get_group_members", "get-group-members results", ("tenant", "result")
        )
        self.shutdown_drain = r.counter(
            "mics_shutdown_drain", "Sessions closed by graceful shutdown", ("node",)
        )
        self.internal_errors = r.counter(
            "mics_internal_errors", "Unexpected errors while processing", ("tenant", "where")
        )
