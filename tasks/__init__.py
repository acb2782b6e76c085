"""Prefect tasks: thin wrappers over sft_core; tracking.py is the one place that talks to MLflow."""
