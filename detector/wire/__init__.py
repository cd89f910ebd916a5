"""Wire formats: readings in, anomaly events and dead letters out, and Kafka record values."""
