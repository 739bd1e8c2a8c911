"""Routing policies, one per module; router/registry.py names them."""
