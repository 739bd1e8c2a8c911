"""A simulated vLLM 0.32 pod: same HTTP API, metrics and KV events, with a calibrated cost model.

`kvgate sim` (bench.sim.cli) runs pods as processes; `bench.sim.fleet.SimFleet` runs them in the
current event loop for tests. The simulator shares only the tokenizer with the gateway.
"""
