"""Batch jobs run by cron: import, refresh features, train, build, precompute, evaluate, cleanup."""
