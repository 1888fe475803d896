"""prefpipe: preference optimisation with an offline reference-log-prob cache."""

__version__ = "0.1.0"
