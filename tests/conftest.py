"""Fixtures shared by the whole suite: real services started on demand.

A service starts only when a test asks for its fixture, once per session, and is
stopped when the session ends.
"""

from tests.support.kafka import kafka_broker

__all__ = ["kafka_broker"]
