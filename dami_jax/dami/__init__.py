"""DAMI: interpolation between an Instruct and a Thinking checkpoint, the model pair, and the
pilot-study diagnostics of the path. Depends on models and decoding."""
