"""``python -m ingest``: publish readings or tail anomaly events (see ``ingest.cli``)."""

from __future__ import annotations

from ingest.cli import main

if __name__ == "__main__":
    main()
