"""Hand-written kernels XLA calls through its FFI (optional; callers fall back to XLA)."""
