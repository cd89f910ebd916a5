"""The stream transports: adapters that feed ``detector.pipeline`` and commit its outcome."""
