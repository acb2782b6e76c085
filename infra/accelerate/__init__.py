"""accelerate launch configs shipped as package data: `sft_core.accelerate` (used by `sft_core.launch`)."""
