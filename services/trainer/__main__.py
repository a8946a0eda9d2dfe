"""`python -m services.trainer`: run one trainer instance (settings from HELOX_* env)."""

import sys

from shared.service import run_service

from .app import setup

sys.exit(run_service("trainer", setup))
