"""Prefect tasks: thin wrappers over sft_core; tracking/ is the one package that talks to MLflow."""
