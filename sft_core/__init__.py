"""qwen-sft-pipeline core library: pure functions over data, tokenizers and models.

No Prefect and no MLflow imports here; orchestration lives in `tasks/` and `flows/`.
"""

__version__ = "0.1.0"
