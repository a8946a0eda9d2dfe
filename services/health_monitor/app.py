"""health-monitor wiring. Detectors over train.metrics arrive with the health-monitor issue;
until then the instance runs, heartbeats and stops cleanly, consuming nothing."""

from shared.service import ServiceRuntime


def setup(rt: ServiceRuntime) -> None:
    """No subscriptions yet (see the module docstring)."""
