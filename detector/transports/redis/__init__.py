"""The Redis Streams transport: the consumer group, the worker loop and its health record."""
