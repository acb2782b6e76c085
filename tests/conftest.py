"""Shared fixtures: quiet offline env, a tiny model, the real Qwen2.5 tokenizer when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sft_core import process
from sft_core.tiny_model import shared_dir

# the test session is an entry point: the product's process set-up, offline, and no inherited tracking store
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)
process.configure_process()

REPO = Path(__file__).resolve().parent.parent
SHARED = shared_dir()  # QWEN_SFT_SHARED_DIR=/nonexistent runs the suite as a clone without ../shared
REAL_ROWS = SHARED / "data" / "delicate_medical_r1_sample.jsonl"
QWEN_TOKENIZER = SHARED / "qwen2.5-tokenizer"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Qwen2 with the real Qwen2.5 tokenizer when available, else the BPE fallback."""
    from sft_core.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def require(present: bool, what: str) -> None:
    """Skip a test whose input is missing on a user's clone; in CI (CI=true) that input is there, so its absence
    is a failure, never a silent skip."""
    if present:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is missing in CI, where it must be present")
    pytest.skip(f"{what} is not on this machine")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    require((QWEN_TOKENIZER / "tokenizer.json").exists(), "the real Qwen2.5 tokenizer (../shared/qwen2.5-tokenizer)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))


@pytest.fixture(scope="session")
def real_rows() -> list[dict]:
    require(REAL_ROWS.exists(), "the real dataset sample (../shared/data)")
    import json

    return [json.loads(x) for x in REAL_ROWS.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (its start costs ~20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(autouse=True)
def _isolate_tracking_env(monkeypatch):
    """`mlflow.set_tracking_uri` writes MLFLOW_TRACKING_URI into os.environ: keep one test's URI out of the next."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    for key in keys:
        os.environ.pop(key, None)
    monkeypatch.setattr(process, "_user_environment", {k: v for k, v in os.environ.items() if k not in keys})
    yield
    for key in keys:
        os.environ.pop(key, None)


@pytest.fixture(scope="session")
def format_model_dir(tmp_path_factory) -> Path:
    """A tiny model fine-tuned until it answers `<think>…</think>` + answer and stops (tests/format_model.py)."""
    from tests.format_model import train_format_model

    return train_format_model(tmp_path_factory.mktemp("format-model"))
