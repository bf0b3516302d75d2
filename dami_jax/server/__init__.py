"""The OpenAI-compatible HTTP server over the engine: the engine's thread (runner), the wire
format (protocol), reasoning intensity per request (intensity), Prometheus metrics, and the app."""
