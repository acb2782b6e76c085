"""Checks that run before any work, one list for `qwen-sft run` and a scheduled run alike: a bad setting, path or
file, or a tracking server that does not answer, fails in seconds with its one-line error.

`preflight` runs them in order, cheapest first: the output paths, the sources, the data file (parsed: the
same reader as the ingest stage, which then finds the file's hash known and reads it once more, not
twice), the prompt against `data.max_length` when the model is at hand, then the caller's reachability
check of the tracking store (MLflow lives outside this library). A config that passed once in a process
is not checked again there: `qwen-sft run` checks before Prefect starts, and the flow it starts finds
it done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

from sft_core.config import PipelineConfig
from sft_core.data import BUNDLED_SAMPLE, load_rows, require_regular_file
from sft_core.errors import ConfigError
from sft_core.gguf import is_gguf
from sft_core.modeling import load_tokenizer
from sft_core.sample_model import SMOLLM2
from sft_core.sources import parse_data_source, parse_model_source
from sft_core.stage_engine import read_done
from sft_core.stages import STAGES
from sft_core.tokenize import check_prompt_fits

T = TypeVar("T")
_NOT_ASKED = object()
_PASSED: dict[tuple, object] = {}  # (config, data file stamp) -> what the reachability check returned


def inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def check_output_paths(cfg: PipelineConfig) -> None:
    """Output folders named in the config must stay inside the workdir."""
    root = cfg.workdir_path
    for key, value in (("data.cache_dir", cfg.data.cache_dir), ("model.cache_dir", cfg.model.cache_dir)):
        if value is None:
            continue
        p = Path(value).expanduser()
        p = p if p.is_absolute() else root / p
        if not inside(p, root):
            raise ConfigError(f"{key}='{value}' points outside the workdir {root}; use a path inside it "
                              "(or MODELSCOPE_CACHE / HF_HOME for a shared download cache)")


def check_sources(cfg: PipelineConfig) -> None:
    """Source URIs parse (hub ids are owner/name), local data files and model folders exist."""
    data = parse_data_source(cfg.data.source, revision=cfg.data.revision)
    if data.kind == "local" and data.path.exists():  # a FIFO or a folder: refused as `validate` refuses it
        require_regular_file(data.path)
    if data.kind == "local" and not data.path.is_file():
        raise ConfigError(f"data.source='{cfg.data.source}': no such file")
    model = parse_model_source(cfg.model.source, revision=cfg.model.revision)
    if model.kind == "local" and not (model.path / "config.json").is_file():
        raise ConfigError(f"model.source='{cfg.model.source}': no model folder there "
                          f"(expected {model.path / 'config.json'})")
    if model.kind == "gguf":
        if not model.path.is_file():
            hint = " (fetch it with `qwen-sft fetch-sample-model`)" if model.path.name == SMOLLM2.file_name else ""
            raise ConfigError(f"model.source='{cfg.model.source}': no such file {model.path}{hint}")
        if not is_gguf(model.path):
            raise ConfigError(f"model.source='{cfg.model.source}': {model.path} is not a GGUF file")


def check_readable(cfg: PipelineConfig) -> None:
    """A local data file parses into rows (a hub dataset is fetched by the ingest stage): a bad file fails in
    seconds with its one-line error, before any orchestration starts."""
    if parse_data_source(cfg.data.source, revision=cfg.data.revision).kind in ("local", "bundled"):
        d = cfg.data
        load_rows(d.source, subset=d.subset, split=d.split, revision=d.revision, cache_dir=d.cache_dir)


def local_model_dir(cfg: PipelineConfig) -> Path | None:
    """The base model's folder when it needs no build or download (a local folder, or a finished base-model stage)."""
    src = parse_model_source(cfg.model.source, revision=cfg.model.revision)
    if src.kind == "local":
        return src.path
    stage = STAGES["base-model"]
    done = read_done(stage.folder_of(cfg, stage.key_of(cfg)), stage.result)
    return Path(done.model_dir) if done is not None else None


def check_prompt_room(cfg: PipelineConfig) -> None:
    """The prompt leaves room for an answer in data.max_length, when the model is at hand (a download or a build
    waits for the base-model stage, whose tokenize stage checks it then)."""
    model_dir = local_model_dir(cfg)
    if model_dir is not None:
        check_prompt_fits(cfg, load_tokenizer(model_dir))


CHECKS: tuple[Callable[[PipelineConfig], None], ...] = (check_output_paths, check_sources, check_readable,
                                                         check_prompt_room)


def preflight(cfg: PipelineConfig, *, reachable: Callable[[PipelineConfig], T] | None = None) -> T | None:
    """Every check of `CHECKS`, then `reachable(cfg)` (the tracking store's); what `reachable` returns.

    (eval.harness without lm-evaluation-harness installed is not refused: the flow skips it and says so.)
    """
    stamp = (cfg.model_dump_json(), _data_stamp(cfg))
    if stamp not in _PASSED:
        for check in CHECKS:
            check(cfg)
        _PASSED[stamp] = _NOT_ASKED
    if reachable is not None and _PASSED[stamp] is _NOT_ASKED:
        _PASSED[stamp] = reachable(cfg)
    found = _PASSED[stamp]
    return None if found is _NOT_ASKED else found  # type: ignore[return-value]


def _data_stamp(cfg: PipelineConfig) -> tuple:
    """The data file's size and time (a file changed since it was checked is checked again)."""
    src = parse_data_source(cfg.data.source, revision=cfg.data.revision)
    path = BUNDLED_SAMPLE if src.kind == "bundled" else src.path
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return ()
    return (st.st_size, st.st_mtime_ns) if st else ()
