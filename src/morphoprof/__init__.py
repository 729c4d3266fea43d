"""morphoprof: deep-learning morphological profiling of high-content microscopy screens."""

__version__ = "0.1.0"
