"""The health-monitor service."""
