"""Service wiring (filled in as the service's domain logic lands)."""

from shared.service import ServiceRuntime


def setup(rt: ServiceRuntime) -> None:
    """No subscriptions yet."""
