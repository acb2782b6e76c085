"""sft_core/sources.py: `parse_data_source` and `parse_model_source`, every accepted form and every refusal."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sft_core.errors import ConfigError
from sft_core.sources import Source, parse_data_source, parse_model_source

DATA_SCHEMES = ("use modelscope://owner/name, hf://owner/name, a local .jsonl/.json/.parquet/.csv file, or 'sample'")
MODEL_SCHEMES = ("use modelscope://owner/name, hf://owner/name, tiny://, a local model folder or a local .gguf file")


# --- data sources ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["sample", "bundled://sample", "  sample  "])
def test_the_bundled_sample_is_named_sample_or_bundled_sample(raw):
    src = parse_data_source(raw)
    assert src == Source("bundled", raw.strip())
    assert (src.name, src.uri(), src.is_hub, src.path) == ("sample", raw.strip(), False, None)


@pytest.mark.parametrize("kind", ["modelscope", "hf"])
def test_a_hub_dataset_is_owner_and_name_with_an_optional_revision(kind):
    src = parse_data_source(f"{kind}://krisfu/delicate_medical_r1_data")
    assert src == Source(kind, f"{kind}://krisfu/delicate_medical_r1_data", repo_id="krisfu/delicate_medical_r1_data")
    assert src.is_hub and src.name == "delicate_medical_r1_data" and src.path is None
    pinned = parse_data_source(f"{kind}://krisfu/delicate_medical_r1_data@v1.2")
    assert (pinned.repo_id, pinned.revision) == ("krisfu/delicate_medical_r1_data", "v1.2")
    assert pinned.uri() == f"{kind}://krisfu/delicate_medical_r1_data@v1.2"


def test_a_hub_scheme_is_case_insensitive_and_a_trailing_slash_is_dropped():
    src = parse_data_source("HF://Owner/Name/")
    assert (src.kind, src.repo_id, src.uri()) == ("hf", "Owner/Name", "hf://Owner/Name")


def test_the_configs_revision_applies_when_the_uri_names_none_and_must_agree_when_it_does():
    assert parse_data_source("hf://o/n", revision="main").revision == "main"
    assert parse_data_source("hf://o/n", revision="main").uri() == "hf://o/n@main"
    assert parse_data_source("hf://o/n@main", revision="main").revision == "main"
    assert parse_data_source("hf://o/n@abc123").revision == "abc123"
    assert parse_data_source("hf://o/n@feature/x").revision == "feature/x", "a branch name may hold a slash"
    with pytest.raises(ConfigError) as err:
        parse_data_source("hf://o/n@dev", revision="main")
    assert str(err.value) == "data.source='hf://o/n@dev' names revision 'dev' but the config's revision is 'main'"


@pytest.mark.parametrize(("raw", "got"), [("hf://justname", "justname"), ("hf://", "(nothing)"),
                                          ("hf://a/b/c", "a/b/c"), ("hf://-a/b", "-a/b"), ("hf://a/..", "a/..")])
def test_a_hub_id_that_is_not_owner_slash_name_is_refused_with_an_example(raw, got):
    with pytest.raises(ConfigError) as err:
        parse_data_source(raw)
    assert str(err.value) == (f"data.source='{raw}': a hf id is owner/name (optionally @revision), "
                              f"e.g. hf://Qwen/Qwen2.5-1.5B; got '{got}'")


def test_a_revision_that_is_not_a_branch_tag_or_commit_is_refused():
    with pytest.raises(ConfigError) as err:
        parse_data_source("modelscope://o/n@-x y")
    assert str(err.value) == "data.source='modelscope://o/n@-x y': '-x y' is not a revision (a branch, tag or commit)"


@pytest.mark.parametrize(("raw", "path", "name"), [
    ("data/rows.jsonl", Path("data/rows.jsonl"), "rows"),
    ("/abs/rows.parquet", Path("/abs/rows.parquet"), "rows"),
    ("file:///abs/rows.csv", Path("/abs/rows.csv"), "rows"),
    ("file://rel/rows.json", Path("rel/rows.json"), "rows"),
    ("owner/name", Path("owner/name"), "name"),  # a hub id without its scheme is a local path (ingest says so)
])
def test_a_local_data_file_is_a_path_or_a_file_uri(raw, path, name):
    src = parse_data_source(raw)
    assert src == Source("local", raw, path=path)
    assert (src.name, src.uri(), src.is_hub) == (name, raw, False)


def test_a_home_relative_data_path_is_expanded():
    assert parse_data_source("~/rows.jsonl").path == Path.home() / "rows.jsonl"


@pytest.mark.parametrize("raw", ["s3://bucket/rows.jsonl", "bundled://other", "tiny://qwen2", "gguf:///m.gguf"])
def test_a_data_source_with_another_scheme_is_refused_naming_the_accepted_ones(raw):
    scheme = raw.split("://")[0]
    with pytest.raises(ConfigError) as err:
        parse_data_source(raw)
    assert str(err.value) == f"data.source='{raw}': unsupported scheme '{scheme}://' ({DATA_SCHEMES})"


def test_the_setting_named_in_an_error_is_the_callers():
    with pytest.raises(ConfigError, match=r"^eval\.source='hf://x': "):
        parse_data_source("hf://x", setting="eval.source")
    with pytest.raises(ConfigError, match=r"^serve\.model='s3://m': unsupported scheme "):
        parse_model_source("s3://m", setting="serve.model")


# --- model sources -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["modelscope", "hf"])
def test_a_hub_model_is_owner_and_name_with_an_optional_revision(kind):
    src = parse_model_source(f"{kind}://Qwen/Qwen2.5-1.5B@main")
    assert src == Source(kind, f"{kind}://Qwen/Qwen2.5-1.5B@main", repo_id="Qwen/Qwen2.5-1.5B", revision="main")
    assert (src.name, src.uri()) == ("Qwen2.5-1.5B", f"{kind}://Qwen/Qwen2.5-1.5B@main")
    with pytest.raises(ConfigError) as err:
        parse_model_source(f"{kind}://Qwen2.5-1.5B")
    assert str(err.value) == (f"model.source='{kind}://Qwen2.5-1.5B': a {kind} id is owner/name (optionally "
                              f"@revision), e.g. {kind}://Qwen/Qwen2.5-1.5B; got 'Qwen2.5-1.5B'")


@pytest.mark.parametrize(("raw", "name"), [("tiny://qwen2", "qwen2"), ("tiny://", "tiny"), ("tiny://x/", "x")])
def test_a_tiny_model_is_tiny_and_named_after_its_uri(raw, name):
    src = parse_model_source(raw)
    assert src == Source("tiny", raw) and src.name == name and src.path is None


@pytest.mark.parametrize(("raw", "path"), [
    ("gguf:///abs/SmolLM2.Q8_0.gguf", Path("/abs/SmolLM2.Q8_0.gguf")),
    ("gguf://models/m.gguf", Path("models/m.gguf")),
    ("models/m.GGUF", Path("models/m.GGUF")),
    ("file:///abs/m.gguf", Path("/abs/m.gguf")),
])
def test_a_gguf_model_is_a_gguf_uri_or_a_path_ending_in_gguf(raw, path):
    src = parse_model_source(raw)
    assert src == Source("gguf", raw, path=path)
    assert src.uri() == raw


def test_a_gguf_uri_without_a_file_is_refused():
    with pytest.raises(ConfigError) as err:
        parse_model_source("gguf://")
    assert str(err.value) == "model.source='gguf://': gguf:// needs a file, e.g. gguf:///abs/model.gguf"


@pytest.mark.parametrize(("raw", "path"), [("./models/qwen", Path("models/qwen")), ("/abs/model", Path("/abs/model")),
                                           ("file:///abs/model", Path("/abs/model")), ("sample", Path("sample"))])
def test_a_local_model_is_a_folder_path_and_sample_means_nothing_special_for_models(raw, path):
    src = parse_model_source(raw)
    assert src == Source("local", raw, path=path) and src.name == path.name


@pytest.mark.parametrize("raw", ["s3://bucket/model", "bundled://sample", "http://host/m"])
def test_a_model_source_with_another_scheme_is_refused_naming_the_accepted_ones(raw):
    scheme = raw.split("://")[0]
    with pytest.raises(ConfigError) as err:
        parse_model_source(raw)
    assert str(err.value) == f"model.source='{raw}': unsupported scheme '{scheme}://' ({MODEL_SCHEMES})"


# --- parsed once --------------------------------------------------------------------------------------------

def test_a_parse_is_remembered_and_an_equal_uri_parses_to_an_equal_immutable_source():
    first = parse_model_source("hf://Qwen/Qwen2.5-1.5B", revision="v1")
    assert parse_model_source("hf://Qwen/Qwen2.5-1.5B", revision="v1") is first, "lru_cached: parsed once per run"
    assert parse_model_source(" hf://Qwen/Qwen2.5-1.5B ", revision="v1") == first, "the same source, however spaced"
    assert parse_model_source("hf://Qwen/Qwen2.5-1.5B", revision="v2") != first
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.revision = "v3"  # type: ignore[misc]
    assert re.fullmatch(r"hf://Qwen/Qwen2\.5-1\.5B@v1", first.uri())


def test_a_refused_source_is_refused_again_not_remembered_as_parsed():
    for _ in range(2):
        with pytest.raises(ConfigError):
            parse_data_source("hf://nothing")
