"""IAD-GPT Edge: industrial anomaly detection exported for inspection stations."""

__version__ = "0.1.0"
