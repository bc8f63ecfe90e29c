"""igds-ray: Interpretability-Guided Data Selection on Ray."""

__version__ = "0.1.0"
