"""`python -m services.health_monitor`: run one health-monitor instance (settings from HELOX_* env)."""

import sys

from shared.service import run_service

from .app import setup

sys.exit(run_service("health-monitor", setup))
