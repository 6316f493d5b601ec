"""Event path (MQ hook): the gateway's asynchronous events to the tenant backend."""
