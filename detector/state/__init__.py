"""Per-series stream state kept in Redis: episodes and the state of stateful kinds."""
