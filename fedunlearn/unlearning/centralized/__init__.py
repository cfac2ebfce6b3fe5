"""Centralized removal methods on the same clients' data pooled at one site, for comparison."""
