"""The stage declarations: one record per stage, a derived code version, typed results, _DONE.json as the record."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sft_core.config import load_config
from sft_core.results import Evaluated
from sft_core.stage_engine import DONE, read_done, run_in_folder
from sft_core.stages import STAGES

REPO = Path(__file__).resolve().parent.parent


def test_every_stage_is_declared_once_with_a_result_type_and_its_modules():
    assert list(STAGES) == ["ingest", "base-model", "validate", "split", "tokenize", "train", "evaluate", "generate",
                            "evaluate-base", "generate-base", "harness"]
    for name, stage in STAGES.items():
        assert stage.name == name and len(stage.code_version()) == 16
        for module in stage.modules:
            assert module.startswith("sft_core."), (name, module)
    assert {"sft_core.train", "sft_core.loss"} <= set(STAGES["train"].modules)
    assert [s.name for s in STAGES.values() if s.keep_partial] == ["train"], "only training resumes from a partial folder"
    assert {s.name for s in STAGES.values() if s.retries} == {"ingest", "base-model"}, "only what reaches a network"


def _write(path: Path, text: str) -> None:
    """Edit a module, as between two runs: code versions are computed once per process, so start afresh."""
    from sft_core import stage_engine

    path.write_text(text, encoding="utf-8")
    stage_engine._code_version_locked.cache_clear()


def test_a_changed_line_of_training_code_retrains_and_a_comment_does_not(tmp_path, monkeypatch):
    """The train stage's key covers the code it runs: editing a line of it gives a new folder (training runs
    again); a comment, a docstring or reformatting gives the same one (training is cached)."""
    probe = tmp_path / "probe_train_code.py"
    _write(probe, 'def lr_scale(x):\n    """How the learning rate is scaled."""\n    return x * 1.0\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = dataclasses.replace(STAGES["train"], modules=(*STAGES["train"].modules, "probe_train_code"))
    cfg = load_config("demo", [f"workdir={tmp_path / 'work'}"])
    inputs = _train_inputs()
    first = stage.key_of(cfg, **inputs)

    _write(probe, 'def lr_scale(x):  # a comment\n    """Another docstring."""\n\n    return (x\n            * 1.0)\n')
    assert stage.key_of(cfg, **inputs) == first, "comments, docstrings and formatting do not count"
    _write(probe, 'def lr_scale(x):\n    return x * 2.0\n')
    assert stage.key_of(cfg, **inputs) != first, "a changed line of code does"


def _train_inputs() -> dict:
    from sft_core.results import BaseModel, Split, Tokenized

    splits = Split(key="s", folder="f", train="t", val="v", train_rows=1, val_rows=1, train_digest="t",
                   val_digest="v", select="s", report="r", select_rows=0, report_rows=1, sets="j", sets_digest="d")
    return {"tokens": Tokenized(key="k", folder="f", train_ds="t", select_ds="s", report_ds="r", stats={}, ids="i"), "splits": splits,
            "model": BaseModel(key="m", folder="f", model_dir="m"), "max_new_tokens": 64}


def test_a_changed_stage_runs_again_into_a_new_folder_and_an_unchanged_one_is_reused(tmp_path, monkeypatch):
    """End to end on a real stage (split): the same code reuses the folder; new code writes a new one."""
    from sft_core.results import Validated

    monkeypatch.syspath_prepend(str(tmp_path))
    probe = tmp_path / "probe_split_code.py"
    _write(probe, "X = 1\n")
    cfg = load_config("demo", [f"workdir={tmp_path / 'work'}"])
    rows = tmp_path / "valid.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i}", "think": "t", "answer": "a"}) + "\n" for i in range(20)))
    valid = Validated(key="v", folder=str(tmp_path), valid=str(rows), digest="d", good_rows=20, bad_rows=0)
    stage = dataclasses.replace(STAGES["split"], modules=(*STAGES["split"].modules, "probe_split_code"))
    first = stage.run(cfg, valid=valid)
    assert not first.reused and first.train_rows == 18 and first.val_rows == 2
    again = stage.run(cfg, valid=valid)
    assert again.reused and again == first
    _write(probe, "X = 1  # only a comment\n")
    assert stage.run(cfg, valid=valid).reused
    _write(probe, "X = 2\n")
    changed = stage.run(cfg, valid=valid)
    assert not changed.reused and changed.folder != first.folder


def test_done_is_the_one_record_and_a_foreign_or_stale_record_is_not_trusted(tmp_path):
    folder = tmp_path / "evaluate" / "k"
    ran = []

    def body(f: Path) -> Evaluated:
        ran.append(1)
        return Evaluated(key="k", folder=str(f), metrics={"loss": 2.0})

    first = run_in_folder(folder, body, Evaluated)
    assert json.loads((folder / DONE).read_text())["metrics"] == {"loss": 2.0} and "reused" not in (folder / DONE).read_text()
    assert read_done(folder, Evaluated) == first
    (folder / DONE).write_text(json.dumps({"key": "k", "folder": str(folder)}))  # a record older code wrote
    assert read_done(folder, Evaluated) is None
    again = run_in_folder(folder, body, Evaluated)
    assert not again.reused and len(ran) == 2, "a record that does not parse as the result type is redone"
    assert run_in_folder(folder, body, Evaluated, refresh=True).reused is False and len(ran) == 3


# --- rooms and process set-up ------------------------------------------------------------------

def test_importing_the_product_changes_no_environment_variable():
    code = ("import os; before = dict(os.environ)\n"
            "import flows.cli, flows.finetune, flows.deploy, tasks.stage, tasks.track, tasks.tracking\n"
            "import sft_core.stages, sft_core.train, sft_core.launch, sft_core.generate, sft_core.harness\n"
            "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
            "print(sorted(changed))")
    env = {k: v for k, v in os.environ.items() if k not in __import__("sft_core.process").process.PROCESS_DEFAULTS}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_no_module_writes_the_environment_at_its_top_level():
    offenders = []
    for package in ("sft_core", "tasks", "flows"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                src = ast.unparse(node)
                if "os.environ" in src and ("setdefault" in src or "] =" in src or ".update(" in src):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_only_the_tracking_package_imports_mlflow_and_the_library_imports_no_orchestration():
    def imports(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        return found

    for path in REPO.joinpath("sft_core").rglob("*.py"):
        assert not imports(path) & {"prefect", "mlflow", "tasks", "flows"}, path
    for package in ("tasks", "flows"):
        for path in REPO.joinpath(package).rglob("*.py"):
            if "tracking" not in path.relative_to(REPO).parts:
                assert "mlflow" not in imports(path), path


def test_trl_is_a_benchmark_extra_the_product_never_imports():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not any(dep.lower().startswith("trl") for dep in project["dependencies"])
    assert any(dep.startswith("trl==") for dep in project["optional-dependencies"]["bench"])
    for package in ("sft_core", "tasks", "flows"):
        for path in REPO.joinpath(package).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert "trl" not in names, path


def test_the_cli_and_the_deploy_module_do_not_import_each_other():
    deploy = (REPO / "flows" / "deploy.py").read_text(encoding="utf-8")
    assert "flows.cli" not in deploy
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import flows.cli"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    loaded = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line]
    assert "flows.deploy" not in loaded and "prefect" not in loaded, "the CLI imports orchestration only when a command needs it"


@pytest.mark.parametrize("name", ["demo", "qwen2.5-1.5b-medical"])
def test_presets_are_read_from_the_package(name):
    from importlib import resources

    assert (resources.files("sft_core.configs") / f"{name}.yaml").is_file()
    assert load_config(name) == load_config(f"configs/{name}.yaml")


def test_a_users_own_suite_file_is_used_instead_of_the_shipped_one(tmp_path):
    """`data.suite` names a shipped suite or the user's own .json: a suite that demands 1,000 rows refuses the
    sample, the shipped one takes it."""
    from importlib import resources

    from sft_core.data import read_jsonl
    from sft_core.errors import ConfigError, DataValidationError
    from sft_core.validation import suite_path, validate_rows

    shipped = json.loads((resources.files("sft_core.expectations") / "delicate_medical_r1.json").read_text("utf-8"))
    for expectation in shipped["expectations"]:
        if expectation["type"] == "expect_table_row_count_to_be_between":
            expectation["kwargs"], expectation["meta"] = {"min_value": 1000}, {"reason": "my team needs 1000 rows"}
    own = tmp_path / "my_suite.json"
    own.write_text(json.dumps(shipped), encoding="utf-8")
    rows = read_jsonl(resources.files("sft_core") / "sample_data" / "medical_sample.jsonl")[:20]
    assert validate_rows(rows, source_name="sample", data_docs=False).success
    with pytest.raises(DataValidationError, match="my team needs 1000 rows"):
        validate_rows(rows, source_name="sample", suite=str(own), data_docs=False)
    with pytest.raises(ConfigError, match="not found"):
        suite_path(str(tmp_path / "missing.json"))


def test_the_generate_stage_says_how_far_it_is(tmp_path):
    """Besides training's step lines, generation (minutes at the real size) logs one line per batch."""
    from sft_core import stages

    cfg = load_config("demo", [f"workdir={tmp_path}", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
                               "model.tiny.vocab_size=1024", "eval.num_generate=5", "eval.generate_batch_size=2"])
    prepared = stages.prepare_data(cfg, log=lambda _: None)
    lines: list[str] = []
    stages.STAGES["generate"].run(cfg, extras={"log": lines.append}, model=prepared.model, splits=prepared.splits,
                                  max_new_tokens=4)
    assert lines == ["answered 2/5 report questions", "answered 4/5 report questions",
                     "answered 5/5 report questions"]


_OPENED: list[str] = []


def _count_opens(event: str, args: tuple) -> None:
    if event == "open" and _OPENED and isinstance(args[0], (str, Path)):
        _OPENED.append(str(args[0]))


def test_a_run_parses_its_data_source_once_and_reads_the_file_at_most_twice(tmp_path):
    """The preflight and the data stages of a run (everything that reads `data.source`): one parse, two reads at
    most (the preflight's check, then ingest, which finds the file's hash already known)."""
    from sft_core.data import BUNDLED_SAMPLE
    from sft_core.preflight import preflight
    from sft_core.sources import parse_data_source
    from sft_core.stages import prepare_data

    data = tmp_path / "rows.jsonl"
    data.write_bytes(BUNDLED_SAMPLE.read_bytes())
    cfg = load_config("demo", [f"workdir={tmp_path / 'work'}", f"data.source={data}", "model.tiny.hidden_size=32",
                               "model.tiny.intermediate_size=64", "model.tiny.vocab_size=1024"])
    sys.addaudithook(_count_opens)  # a hook stays for the process: it counts only while _OPENED is non-empty
    parse_data_source.cache_clear()
    _OPENED[:] = ["(counting)"]
    try:
        preflight(cfg)
        prepare_data(cfg, log=lambda _: None)
        parses = parse_data_source.cache_info().misses
    finally:
        opened, _OPENED[:] = _OPENED[1:], []
    reads = [p for p in opened if Path(p).resolve() == data.resolve()]
    assert parses == 1, "data.source parsed more than once"
    assert 1 <= len(reads) <= 2, f"the data file was opened {len(reads)} times"
