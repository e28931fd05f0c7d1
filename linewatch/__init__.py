"""linewatch: streaming anomaly inspection for power-line video."""
__version__ = "0.1.0"
