"""The engine: execute a plan tensor by tensor (compute, numerics, row blocks, statistics, pipeline, memory, device)."""
