"""Synapse, the Helox event bus: runtime, outbox, idempotency, heartbeats, admin views."""

from .idempotency import Idempotency, idempotent
from .outbox import Outbox
from .runtime import CURRENT_EVENT, Bus, Delivery, Requeue

__all__ = ["CURRENT_EVENT", "Bus", "Delivery", "Idempotency", "Outbox", "Requeue", "idempotent"]
