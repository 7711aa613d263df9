"""Streamlearn: learn continuously from Kafka streams and serve the newest model over HTTP."""

__version__ = "0.1.0"
