"""zsadlib: a reproducibility suite for CLIP-based zero-shot anomaly detection."""

__version__ = "0.1.0"
