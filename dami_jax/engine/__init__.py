"""Continuous batching with a lambda per slot: requests, a scheduler in plain Python, a runtime that
owns the device state, a per-slot cache backend read only as far as it is live, materialized
thetas, memory sizing, the engine facade and ``serve`` on top."""
