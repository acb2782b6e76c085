"""Presets shipped as package data: `sft_core.configs` (read with importlib.resources)."""
