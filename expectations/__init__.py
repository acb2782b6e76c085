"""Great Expectations suites shipped as package data: `sft_core.expectations`."""
