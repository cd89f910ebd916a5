"""Real Redis and PostgreSQL processes for `make run` and the tests, without Docker or root."""
