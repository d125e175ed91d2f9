"""Analyses that reproduce the papers' evidence on the reference models."""
