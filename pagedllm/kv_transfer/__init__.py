"""KV blocks beyond the GPU pool: a host-memory tier of the prefix cache (CPU offload) and KV transfer between engines
(disaggregated prefill), both keyed by the prefix cache's block hashes."""
