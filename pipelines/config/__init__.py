"""Configuration: run configs, their sections, file loading and default paths (no torch)."""
