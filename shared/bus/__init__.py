"""Synapse, the Helox event bus: runtime, outbox, idempotency, heartbeats."""

from .runtime import CURRENT_EVENT, Bus, Delivery

__all__ = ["CURRENT_EVENT", "Bus", "Delivery"]
