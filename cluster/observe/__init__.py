"""Observability: telemetry providers and exporters, metrics gathering, dashboards, recordings."""
