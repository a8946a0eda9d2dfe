"""Helox services: one package per process."""
