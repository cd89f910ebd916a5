"""The detector on Kafka: a faust-streaming agent scoring topic `readings` into `anomalies`."""
