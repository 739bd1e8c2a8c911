"""kvgate bench: the vLLM-compatible simulator, workloads, load generator and reports."""
