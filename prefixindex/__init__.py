"""kvgate prefix index: tokenizing, block hashing, the index, the KV-event subscriber."""
