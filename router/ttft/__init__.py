"""Predicting a request's time to first token on each pod: the learned model and the live ledger."""
