"""fedunlearn: simulate federated unlearning on Flower + Ray.

Train a federation, ask it to forget clients, and compare removal methods against retraining.
"""

__version__ = "0.1.0"
