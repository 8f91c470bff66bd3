"""Shared plumbing for the AGREE scripts: input validation, atomic output, JSONL I/O."""
