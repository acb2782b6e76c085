"""Config: presets load, overrides apply, unknown keys and bad values are named, hashes are stable."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft_core.config import PipelineConfig, load_config, redact
from sft_core.errors import ConfigError


def test_presets_load_with_the_tutorial_hyperparameters():
    real = load_config("configs/qwen2.5-1.5b-medical.yaml")
    assert real.model.source == "modelscope://Qwen/Qwen2.5-1.5B"
    assert real.data.source == "modelscope://krisfu/delicate_medical_r1_data"
    assert (real.data.subset, real.data.split, real.data.max_length) == ("default", "train", 2048)
    t = real.train
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs, t.learning_rate) == (1, 4, 2, 1e-4)
    assert (t.eval_steps, t.logging_steps, t.save_steps, t.gradient_checkpointing) == (100, 10, 400, True)
    assert real.data.system_prompt.startswith("你是一个医学专家")
    demo = load_config("demo")
    assert demo.model.source.startswith("tiny://") and demo.train.device == "cpu"


def test_set_overrides_parse_yaml_scalars_and_nested_keys():
    cfg = load_config("demo", ["train.learning_rate=5e-5", "eval.do_sample=true", "registry.gate.min_format_ok_delta=0.1",
                               "tracking.uri=null"])
    assert cfg.train.learning_rate == 5e-5 and cfg.eval.do_sample is True
    assert cfg.registry.gate.min_format_ok_delta == 0.1 and cfg.tracking.uri is None


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.learnin_rate=1", "train.learnin_rate"),
        ("trian.epochs=1", "trian"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("train.learning_rate=-1e-4", "train.learning_rate"),
        ("train.per_device_train_batch_size=many", "train.per_device_train_batch_size"),
        ("data.max_length=8", "data.max_length"),
        ("data.validation_policy=ignore", "data.validation_policy"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("demo", [override])


def test_unknown_key_in_a_file_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochz: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_config(f)


def test_env_tracking_uri_wins_over_default_but_not_over_set(monkeypatch, tmp_path):
    """One function decides the store, with the environment as the user set it (not as MLflow rewrites it)."""
    import mlflow

    from sft_core import process
    from tasks.tracking import tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setattr(process, "_user_environment", None)
    process.configure_process()
    cfg = load_config("demo", [f"workdir={tmp_path}"])
    assert cfg.tracking.uri is None, "the config holds what the preset says; the environment is read where it runs"
    assert tracking_uri(cfg) == "http://127.0.0.1:5999"
    assert tracking_uri(load_config("demo", ["tracking.uri=http://other:5000"])) == "http://other:5000"
    mlflow.set_tracking_uri("sqlite:///elsewhere.db")  # writes MLFLOW_TRACKING_URI into os.environ
    assert tracking_uri(cfg) == "http://127.0.0.1:5999"
    monkeypatch.setattr(process, "_user_environment", {})
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_round_trip_and_stable_hash(tmp_path):
    cfg = load_config("demo", ["train.seed=7"])
    f = tmp_path / "round.yaml"
    f.write_text(cfg.to_yaml(), encoding="utf-8")
    again = load_config(f)
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()
    assert load_config("demo", ["train.seed=8"]).config_hash() != cfg.config_hash()
    # where outputs go and where they are tracked do not change results
    assert load_config("demo", ["workdir=/tmp/elsewhere", "tracking.uri=http://x:1"]).config_hash() == \
        load_config("demo").config_hash()


def test_flat_params_are_dotted_and_secrets_redacted():
    cfg = PipelineConfig.model_validate({"tracking": {"uri": "http://alice:s3cret@mlflow:5000"}})
    params = cfg.flat_params()
    assert params["train.learning_rate"] == "0.0001"
    assert "s3cret" not in params["tracking.uri"] and "alice" in params["tracking.uri"]
    assert "s3cret" not in cfg.to_yaml()
    assert redact({"api_token": "abc", "nested": {"password": "p"}}) == {"api_token": "***", "nested": {"password": "***"}}


def test_missing_file_names_it():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("nope.yaml")


def test_a_path_is_a_path_and_only_a_bare_name_is_a_preset(tmp_path, monkeypatch):
    """`-c ./typo-dir/demo.yaml` silently ran the shipped preset of the same name. A path (a slash in it, or a
    .yaml/.yml name) is read as a path and must exist; only a bare name means a shipped preset."""
    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo)
    assert load_config("configs/demo.yaml") == load_config("demo")  # README's and the Makefile's command, from the repo
    monkeypatch.chdir(tmp_path)
    for typo in ("./typo-dir/demo.yaml", "configs/demo.yaml", "demo.yaml", "demo.yml"):
        with pytest.raises(ConfigError) as missing:
            load_config(typo)
        assert str(missing.value) == (f"config file '{typo}' not found (from {tmp_path}; a bare name is a shipped "
                                      "preset: demo, pretrained-demo, qwen2.5-1.5b-medical)")
    (tmp_path / "mine.yaml").write_text("name: mine\n", encoding="utf-8")
    assert load_config("mine.yaml").name == "mine" and load_config("./mine.yaml").name == "mine"
    assert load_config("demo").name == load_config(str(repo / "configs" / "demo.yaml")).name
    with pytest.raises(ConfigError, match=r"^no preset named 'demoo' \(presets: demo, pretrained-demo, qwen2.5-1.5b-medical"):
        load_config("demoo")
