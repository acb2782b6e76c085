"""The wheel is the product: built, installed without `-e` into a fresh virtualenv, and run from an empty
directory outside the repository, it finds its presets, its suite and its sample and registers a candidate."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.sizes import NO_GENERATION_WHILE_TRAINING, TINY_MODEL

REPO = Path(__file__).resolve().parent.parent
FAST = [*TINY_MODEL, *NO_GENERATION_WHILE_TRAINING, "train.max_steps=4", "train.eval_steps=2", "train.save_steps=2",
        "eval.num_generate=2", "eval.max_new_tokens=8"]


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_outside_the_source_tree(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(REPO)],
                   check=True, timeout=600)
    (wheel,) = dist.glob("qwen_sft_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("sft_core/configs/demo.yaml", "sft_core/configs/qwen2.5-1.5b-medical.yaml",
                    "sft_core/expectations/delicate_medical_r1.json", "sft_core/accelerate/cpu_gloo.yaml",
                    "sft_core/sample_data/medical_sample.jsonl", "sft_core/harness_task/qwen_sft_medical.yaml"):
        assert shipped in names, shipped

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies are this test environment's (nothing to download): its site-packages joins the path
    # through a .pth line, which does not run that folder's own .pth files (the editable install's finder)
    (Path(site) / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True, timeout=300)

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    where = subprocess.run([str(py), "-c", "import sft_core, flows, tasks; print(sft_core.__file__)"], cwd=empty,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(site) and not where.startswith(str(REPO)), where

    args = [str(venv / "bin" / "qwen-sft"), "run", "--config", "demo", *[x for o in FAST for x in ("--set", o)]]
    done = subprocess.run(args, cwd=empty, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "version 1 as @candidate" in done.stdout, done.stdout[-3000:]
    assert (empty / ".qwen-sft" / "mlflow.db").exists(), "the workdir is where the command ran"
