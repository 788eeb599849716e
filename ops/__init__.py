"""Metrics, health, structured logging, audit and status."""
