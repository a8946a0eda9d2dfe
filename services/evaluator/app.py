"""evaluator wiring. Checkpoint evaluation arrives with the evaluator issue; until then the
instance runs, heartbeats and stops cleanly, consuming nothing."""

from shared.service import ServiceRuntime


def setup(rt: ServiceRuntime) -> None:
    """No subscriptions yet (see the module docstring)."""
