"""kvgate router: endpoints, discovery, load signals, scorers, policies, P/D."""
