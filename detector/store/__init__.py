"""The model store: connections, versions in PostgreSQL and Redis, history, retention."""
