"""`python -m services.data_prep`: run one data-prep instance (settings from HELOX_* env)."""

import sys

from shared.service import run_service

from .app import setup

sys.exit(run_service("data-prep", setup))
