"""A run's story: checks before work, the engine, training with history, serving removal
requests, verification, results; and resuming an interrupted run.

Kept free of imports so that the command line starts fast (:mod:`fedunlearn.cli`).
"""
