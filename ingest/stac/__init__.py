"""Ingest from the archive: STAC search, S1/S2 pairing and patch reading from scene COGs."""
