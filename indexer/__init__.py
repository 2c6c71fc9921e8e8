"""faceindex: a streaming face indexer."""

__version__ = "0.1.0"
