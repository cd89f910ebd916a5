"""Producers and subscribers of the streams: publish readings, tail anomaly events."""
