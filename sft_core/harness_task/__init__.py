"""lm-evaluation-harness task shipped with the package: the YAML and its metric functions (utils.py)."""
