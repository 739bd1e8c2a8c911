"""Comparison reports: terminal table and progress bar, JSON, Markdown and PNG plots."""
