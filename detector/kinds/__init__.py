"""Detector kinds: the interface, the registry and one module a kind."""
