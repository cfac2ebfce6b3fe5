"""Federated removal methods: one file per method, each served through the federation port."""
