"""Callbacks: export, throughput and progress."""
