"""Gateway replicas that agree: approximate prefix learning and per-pod load shared through Redis."""
