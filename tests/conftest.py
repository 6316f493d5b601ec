"""Fixtures shared by the whole suite: real services started on demand.

A service starts only when a test asks for its fixture, once per session, and is
stopped when the session ends.
"""

from tests.support.kafka import kafka_broker
from tests.support.postgres import postgres_db, postgres_server
from tests.support.redis import redis_server, redis_url

__all__ = ["kafka_broker", "postgres_db", "postgres_server", "redis_server", "redis_url"]
