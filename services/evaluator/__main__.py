"""`python -m services.evaluator`: run one evaluator instance (settings from HELOX_* env)."""

import sys

from shared.service import run_service

from .app import setup

sys.exit(run_service("evaluator", setup))
