"""Helox library code shared by the services: bus runtime, config, logging, model, data, checkpoints."""
