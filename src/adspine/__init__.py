"""adspine: which CNN backbone makes embedding-comparison anomaly detection work best, and at what speed."""

__version__ = "0.1.0"
