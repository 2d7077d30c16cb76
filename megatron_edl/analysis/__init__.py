"""Routing telemetry readers, specialization metrics and plots."""
