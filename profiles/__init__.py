"""Target profiles shipped as TOML data files (see runtime/targets.py)."""
