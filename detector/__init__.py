"""Streaming anomaly detection: the model, the versioned model store and the stream worker."""
