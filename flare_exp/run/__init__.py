"""The run dir's life, from open to close: its name, lock, attempts, fingerprint, markers and provenance."""
