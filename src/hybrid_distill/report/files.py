"""Atomic file output for reports: a reader sees the old file or the complete new one, never a half-written table."""
from hybrid_distill.distill.atomic import write_bytes_atomic, write_text_atomic

__all__ = ["write_bytes_atomic", "write_text_atomic"]
