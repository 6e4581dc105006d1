"""faceclf: train, evaluate, export and score a small face-image classifier.

A plain library (no Prefect imports): the Prefect flows in ``flows/`` wrap these functions.
"""

__version__ = "0.1.0"
