"""The old name of the batched engine, kept until every caller imports `extractor.engine.Engine`."""

from extractor.engine import Engine as BatchedLlamaEngine

__all__ = ["BatchedLlamaEngine"]
