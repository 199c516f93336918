"""`tollway pipeline`: sealed event segments ─idempotent ingest─▶ events.duckdb ─▶ reports, retention.

With `[events] sink = "segments"` every gateway process seals its events into Parquet segments
(`proxy.sinks.segments`); this one process owns `events.duckdb`: it ingests the segments
(`ingest`), runs the report schedule and retention (`runner`), and is the `tollway pipeline`
command (`cli`).
"""
