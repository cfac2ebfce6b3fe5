"""Verification metrics: did the model forget, and at what cost."""
