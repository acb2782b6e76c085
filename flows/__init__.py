"""Prefect flows and the qwen-sft CLI."""
