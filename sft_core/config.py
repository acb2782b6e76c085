"""Typed configuration: one pydantic tree loaded from YAML, overridable with ``--set k=v``.

Precedence (lowest to highest): model defaults < YAML preset < ``--set`` overrides. The tracking
store (``tracking.uri`` or ``MLFLOW_TRACKING_URI``) is resolved at run time, where the flow runs:
``tasks.tracking.tracking_uri``.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sft_core.errors import ConfigError

DEFAULT_SYSTEM_PROMPT = "你是一个医学专家，你需要根据用户的问题，给出带有思考的回答。"


def presets() -> Path:
    """The folder of the shipped presets (`configs/` in the repository, `sft_core/configs` in the wheel)."""
    return Path(str(resources.files("sft_core.configs")))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where rows come from and how they are checked, split and formatted."""

    source: str = "modelscope://krisfu/delicate_medical_r1_data"
    subset: str | None = "default"
    split: str = "train"
    revision: str | None = None
    cache_dir: str | None = None
    suite: str = "delicate_medical_r1"
    validation_policy: Literal["fail", "quarantine"] = "fail"
    min_rows: int = Field(default=10, ge=1)
    max_field_chars: int = Field(default=20000, ge=1)
    split_method: Literal["shuffle", "hash"] = "shuffle"
    train_fraction: float = Field(default=0.9, gt=0.0, lt=1.0)
    split_seed: int = 42
    # the share of the validation rows that choose the checkpoint (eval loss and the generation check during
    # training); the rest, never seen by selection, report the model's figures (sft_core.split.assign_validation)
    selection_fraction: float = Field(default=0.5, ge=0.0, lt=1.0)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_length: int = Field(default=2048, ge=16)
    truncation: Literal["truncate", "drop"] = "truncate"


class TinyModelConfig(_Section):
    """Shape of the random-weight Qwen2 that `tiny://` sources build."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 4096
    vocab_size: int = 2048  # used only with the self-built BPE fallback
    tokenizer: Literal["auto", "qwen", "bpe"] = "auto"
    seed: int = 0


class ModelConfig(_Section):
    """Which base model to fine-tune and how to load it."""

    source: str = "modelscope://Qwen/Qwen2.5-1.5B"
    revision: str | None = None
    cache_dir: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


class TrainConfig(_Section):
    """Trainer hyper-parameters; defaults are the tutorial's."""

    per_device_train_batch_size: int = Field(default=1, ge=1)
    per_device_eval_batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=4, ge=1)
    num_train_epochs: float = Field(default=2.0, gt=0)
    max_steps: int = -1
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = 1.0
    eval_steps: int = Field(default=100, ge=1)
    logging_steps: int = Field(default=10, ge=1)
    save_steps: int = Field(default=400, ge=1)
    save_total_limit: int = Field(default=2, ge=1)
    gradient_checkpointing: bool = True
    # auto: padding-free on accelerators; padded batches on CPU, where SDPA with a packed mask
    # does ~4x the attention work of padded rows (BENCHMARKS.md, loss micro-benchmark)
    padding_free: bool | Literal["auto"] = "auto"
    # supervised tokens per lm_head + cross-entropy chunk (sft_core.loss); 0: 256 on CPU, 1024 on a GPU
    loss_chunk_size: int = Field(default=0, ge=0)
    group_by_length: bool = True
    loss: Literal["chunked", "standard"] = "chunked"
    # which saved checkpoint becomes the final model: `gen_score` (greedy generation on the validation
    # questions at every checkpoint: the share of answers well-formed and stopped, rouge_l breaking ties),
    # `loss` (eval loss, the tutorial's), `none` (the last step). Eval loss and the job disagree once a small model starts
    # to memorise: its eval loss rises while it learns to answer in the format and stop.
    metric_for_best_model: Literal["gen_score", "loss", "none"] = "gen_score"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_processes: int = Field(default=1, ge=1)
    accelerate_config: Literal["ddp", "fsdp", "deepspeed_zero3"] = "ddp"
    dataloader_num_workers: int = Field(default=0, ge=0)

    @field_validator("learning_rate")
    @classmethod
    def _lr_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v


class EvalConfig(_Section):
    """Validation metrics and sample generation."""

    batch_size: int = Field(default=8, ge=1)
    # questions answered per set (selection at every save, report once per model); null: all of them
    num_generate: int | None = Field(default=None, ge=0)
    generate_batch_size: int = Field(default=16, ge=1)
    # `auto`: the 99th percentile of the validation responses' token counts plus a quarter, capped at
    # data.max_length; a number below their 95th percentile is warned about before generation
    max_new_tokens: int | Literal["auto"] = "auto"
    do_sample: bool = False
    temperature: float = Field(default=0.7, gt=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    repetition_penalty: float = Field(default=1.0, ge=1.0)
    # what generates the answers that are scored (checkpoint selection and the report): `hf` (transformers'
    # batched generate, in this process) or `vllm` (a vLLM server on the model's folder, from its own environment:
    # `make vllm`, or `vllm` / QWEN_SFT_VLLM naming a Python, a virtualenv or the URL of a running server)
    engine: Literal["hf", "vllm"] = "hf"
    vllm: str | None = None
    compare_base: bool = True  # evaluate and generate with the base model too: the table base | fine-tuned
    harness: bool = False  # also run lm-evaluation-harness on the registered version (pip install '.[eval]')

    @field_validator("max_new_tokens")
    @classmethod
    def _positive_budget(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v


class TrackingConfig(_Section):
    """MLflow tracking; `uri: null` means an embedded SQLite store in the workdir."""

    uri: str | None = None
    experiment: str | None = None
    log_checkpoints: Literal["none", "best", "all"] = "best"
    log_model: bool = True


class GateConfig(_Section):
    """Promotion gate (`sft_core.gate`): the candidate against its base and the current production, on the
    report questions, each difference judged by its 95 % interval."""

    # how many points of format rate over production count as better (0: any gain beyond noise)
    min_format_ok_delta: float = Field(default=0.0, ge=0.0)
    # an eval-loss rise over production up to this never counts as worse (0: any rise beyond noise does)
    max_eval_loss_increase: float = Field(default=0.0, ge=0.0)
    # a candidate not distinguishable from production (a weekly retrain as good as the last) passes;
    # against its base it must always be better
    allow_equal: bool = False


# the registry's aliases: the newest registered version, the one serving, the one it replaced (a rollback's target)
CANDIDATE, PRODUCTION, PREVIOUS = "candidate", "production", "previous"
ALIASES = (CANDIDATE, PRODUCTION, PREVIOUS)


class RegistryConfig(_Section):
    name: str = "qwen2.5-1.5b-medical"
    enabled: bool = True  # register a version after each run
    auto_promote: bool = False
    gate: GateConfig = Field(default_factory=GateConfig)


class ScheduleConfig(_Section):
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    work_pool: str = "qwen-sft-process"


class PipelineConfig(_Section):
    """The whole job."""

    name: str = "qwen2.5-1.5b-medical"
    workdir: str = "./.qwen-sft"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> "PipelineConfig":
        if self.data.max_length < 64:
            raise ValueError("data.max_length must be >= 64 to hold the prompt and an answer")
        return self

    # -- derived values ---------------------------------------------------
    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    def section(self, *names: str) -> dict[str, Any]:
        """The dump of the named sections, for cache keys."""
        dump = self.model_dump(mode="json")
        return {n: dump[n] for n in names}

    def config_hash(self) -> str:
        """Stable 12-hex hash of everything that changes results (workdir and tracking excluded)."""
        dump = self.model_dump(mode="json", exclude=set(WHERE_IT_RUNS))
        return stable_hash(dump)

    def flat_params(self) -> dict[str, str]:
        """`section.key` -> value strings, secrets redacted, for MLflow params."""
        return {k: str(v) for k, v in flatten(redact(self.model_dump(mode="json"))).items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(redact(self.model_dump(mode="json")), sort_keys=False, allow_unicode=True)


# where a run lands and when it is scheduled, not what it computes: out of the config hash, the MLflow params
# compared across runs, and run names
WHERE_IT_RUNS = ("workdir", "tracking", "schedule")


def where_it_runs(key: str) -> bool:
    """Whether a dotted config key (`tracking.uri`, `workdir`) says where a run lands rather than what it computes."""
    return key.split(".", 1)[0] in WHERE_IT_RUNS


SECRET_KEY = re.compile(r"(password|passwd|secret|api_?key|access_key|(^|_)token)$", re.IGNORECASE)


_SCHEME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+.-")
_URL_BODY = re.compile(r"[^\s'\"<>]+")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(:\d*)?([/?#]|$)")
_SECRET_QUERY = re.compile(r"(token|key|secret|password|passwd|pwd|sig|signature|auth|credential)", re.IGNORECASE)


def _url_spans(text: str) -> Iterator[tuple[int, int]]:
    """Where `scheme://rest` URLs are in `text` (a scheme is a letter, then letters, digits, `+`, `.`, `-`; the rest
    runs to a space, a quote or `<`/`>`), in linear time.

    A regex that tries a scheme at every position is quadratic on a long run of letters without `://` (a 1 MB
    column name in an error message kept the error printer busy for minutes): this looks for `://` first and
    walks back over the scheme, never past the end of the previous URL.
    """
    pos = 0
    while (sep := text.find("://", pos)) >= 0:
        start = sep
        while start > pos and text[start - 1] in _SCHEME_CHARS:
            start -= 1
        while start < sep and not text[start].isalpha():  # the scheme begins at the run's first letter
            start += 1
        body = _URL_BODY.match(text, sep + 3)
        if start == sep or body is None:
            pos = sep + 1
            continue
        yield start, body.end()
        pos = body.end()


def _authority(url: str) -> tuple[str, str, str] | None:
    """(scheme://, credentials, host and the rest) when `url` holds credentials, else None.

    The credentials run to the last `@` of the authority (a password may hold `@`). A password with an unencoded
    `#`, `/` or `?` ends the authority early for a URL parser: when `user:...` is followed, past such a character,
    by `@host`, the credentials still run to that `@` (a `host:port/path@host` is redacted too: over, never under).
    """
    head, _, rest = url.partition("://")
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        netloc = rest.split("/", 1)[0]
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        return f"{head}://", creds, host + rest[len(netloc):]
    at = rest.rfind("@")
    if ":" in netloc and at > len(netloc) and _HOST_PORT.match(rest, at + 1):
        return f"{head}://", rest[:at], rest[at + 1:]
    return None


def credentials_problem(uri: str) -> str | None:
    """Why the credentials in `uri` cannot be read as written (an unencoded `#`, `/`, `?` or a space in them), or None.

    Only the shape is said, never a character of the password."""
    url = uri.strip()
    if "://" not in url:
        return None
    found = _authority(url.split()[0]) if url.split() else None
    spaced = len(url.split()) > 1 and "@" in url.split(None, 1)[1] and ":" in url.split()[0].partition("://")[2]
    if not spaced and (found is None or not any(ch in found[1] for ch in "#/?")):
        return None
    scheme = url.partition("://")[0]
    user = url.partition("://")[2].split(":", 1)[0]
    host = url.rsplit("@", 1)[1] if "@" in url else "…"
    return (f"{scheme}://{user}:***@{host}: the password holds a character that ends a URI's host part ('#', '/', "
            "'?' or a space); percent-encode it (# %23, / %2F, ? %3F, space %20, @ %40), or leave it out of the URI "
            "and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")


def redact_uri(text: str) -> str:
    """`text` with every URL's password and secret-looking query values replaced by `***`.

    The user name stays when a password follows it (it says whose credentials were meant); a user part
    alone (`https://TOKEN@host`) is a token and is hidden. A password may contain `@` (the host is what
    follows the last `@` of the authority) and, unencoded, `#`, `/` or `?` (see `_authority`).
    """
    def one(url: str) -> str:
        if "@" not in url and "?" not in url:
            return url  # no credentials, no query: nothing to hide
        found = _authority(url)
        if found is not None:
            head, creds, after = found
            user, colon, _ = creds.partition(":")
            url = f"{head}{user}:***@{after}" if colon else f"{head}***@{after}"  # a user part alone may be a token
        try:
            parts = urlsplit(url)
        except ValueError:
            return url
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if _SECRET_QUERY.search(k) and v else v) for k, v in pairs], safe="*")
        if query == parts.query:
            return url  # nothing secret: as written (urlunsplit would drop the empty authority of sqlite:////)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))

    out, last = [], 0
    for start, end in _url_spans(text):
        out += [text[last:start], one(text[start:end])]
        last = end
    return "".join(out) + text[last:]


def redact(obj: Any) -> Any:
    """Replace credential-looking values (by key, or a URL's password and secret query values) with '***'."""
    if isinstance(obj, dict):
        return {
            k: ("***" if SECRET_KEY.search(k) and obj[k] else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str) and "://" in obj:
        return redact_uri(obj)
    return obj


def stable_hash(obj: Any, length: int = 12) -> str:
    payload = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_text(annotation: Any) -> bool:
    """Whether a field holds text (`str` or `str | None`), whose `--set` value is taken as written."""
    args = typing.get_args(annotation)
    return annotation is str or (bool(args) and str in args and all(a in (str, type(None)) for a in args))


def parse_override_value(annotation: Any, raw: str) -> Any:
    """A `--set` value for a field of type `annotation`.

    Text fields take the value as written (a path with `#` or `: ` survives), except `null` / `~`
    (None, where the field allows it) and a quoted value ('...' or "..."), which is unquoted. Every
    other field reads the value as a YAML scalar or list: 5e-5, true, null, [1, 2], auto.
    """
    text = raw.strip()
    if _is_text(annotation):
        if text in ("null", "~") and type(None) in typing.get_args(annotation):
            return None
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError:
                return text
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def format_override(key: str, value: Any) -> str:
    """`key=value` that `load_config` reads back to `value` (text quoted, the rest as JSON, a YAML subset)."""
    return f"{key}={json.dumps(value, ensure_ascii=False)}"


def overrides_between(base: PipelineConfig, cfg: PipelineConfig) -> list[str]:
    """The `--set` overrides that turn `base` into `cfg` (keys in config order)."""
    before, after = flatten(base.model_dump(mode="json")), flatten(cfg.model_dump(mode="json"))
    return [format_override(k, v) for k, v in after.items() if before.get(k) != v]


def split_secrets(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(public, secret) `--set` overrides: a secret one holds a credential (a URI password, a *_token key)."""
    public, secret = [], []
    for item in overrides:
        key, _, value = item.partition("=")
        last = key.strip().rsplit(".", 1)[-1]
        holds = bool(SECRET_KEY.search(last) and value.strip()) or redact_uri(value) != value
        (secret if holds else public).append(item)
    return public, secret


def _field(dotted: str) -> Any:
    """The pydantic field behind `a.b.c`, naming the unknown key when the path does not exist."""
    parts = dotted.split(".")
    model: type[BaseModel] = PipelineConfig
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' (known here: {', '.join(sorted(fields))})")
        if i == len(parts) - 1:
            return fields[part]
        annotation = fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is a value, not a section")
        model = annotation
    raise AssertionError("unreachable")


def apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, naming the unknown key when the path does not exist."""
    _field(dotted)
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' must be a mapping")
    node[parts[-1]] = value


def is_config_path(text: str) -> bool:
    """Whether `--config` names a file (a slash in it, or a `.yaml` / `.yml` name) rather than a shipped preset."""
    return "/" in text or "\\" in text or text.endswith((".yaml", ".yml"))


def resolve_config_path(path: str | Path) -> Path:
    """`--config`: a bare name (`demo`) is a shipped preset; anything else (a slash in it, or a name ending in
    `.yaml` / `.yml`) is a file path, read as written from the current folder, and must exist: a typo in a path
    never falls back to the preset of the same name."""
    text = str(path)
    shown = ", ".join(list_presets())
    if is_config_path(text):
        p = Path(text).expanduser()
        if p.is_file():
            return p
        what = "is a folder, not a YAML file" if p.is_dir() else "not found"
        raise ConfigError(f"config file '{text}' {what} (from {Path.cwd()}; a bare name is a shipped preset: {shown})")
    candidate = presets() / f"{text}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"no preset named '{text}' (presets: {shown}; or give the path of a YAML file)")


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets().glob("*.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
    """Load YAML (or defaults), apply `--set` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        cfg_path = resolve_config_path(path)
        source = str(cfg_path)
        try:
            loaded = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{cfg_path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{cfg_path}: top level must be a mapping")
        tree = loaded
    pairs: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    elif overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like section.key=value")
            key, raw = item.split("=", 1)
            key = key.strip()
            pairs.append((key, parse_override_value(_field(key).annotation, raw)))
    # validate the keys of the file too, so a typo names itself
    _check_keys(tree)
    for key, value in pairs:
        apply_override(tree, key, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise ConfigError(f"invalid config ({source}): '{loc}': {first['msg']}") from exc


def _check_keys(tree: dict[str, Any], model: type[BaseModel] = PipelineConfig, prefix: str = "") -> None:
    for key, value in tree.items():
        if key not in model.model_fields:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known here: {', '.join(sorted(model.model_fields))})")
        annotation = model.model_fields[key].annotation
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(value, annotation, f"{prefix}{key}.")
