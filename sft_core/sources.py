"""Where data and models come from: one parser for every source URI.

Data (`data.source`): ``modelscope://owner/name``, ``hf://owner/name``, ``sample`` /
``bundled://sample`` (the sample shipped in the package), a local file (plain path or
``file://``). Models (`model.source`): ``modelscope://owner/name``, ``hf://owner/name``,
``tiny://`` (a random-weight Qwen2 built here), a local folder, a local ``.gguf`` file (a path, or
``gguf:///abs/file.gguf`` / ``gguf://relative/file.gguf``; converted by the base-model stage). A hub
id is ``owner/name``, optionally ``@revision``; it is validated here and never read as a local path.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sft_core.errors import ConfigError

HUBS = ("modelscope", "hf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
BUNDLED_ALIASES = ("sample", "bundled://sample")


@dataclass(frozen=True)
class Source:
    """A parsed source: a hub repo (`repo_id`, `revision`), a local `path` (a GGUF file's too), the bundled sample,
    or a tiny model."""

    kind: Literal["modelscope", "hf", "local", "gguf", "bundled", "tiny"]
    raw: str
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None

    @property
    def is_hub(self) -> bool:
        return self.kind in HUBS

    @property
    def name(self) -> str:
        """A short name for experiments and runs: the repo or file name without its suffix."""
        if self.is_hub:
            return self.repo_id.split("/")[-1]
        if self.kind == "bundled":
            return "sample"
        if self.kind == "tiny":
            return self.raw.removeprefix("tiny://").strip("/") or "tiny"
        stem = self.path.name if self.path is not None else self.raw
        for suffix in (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".gguf"):
            stem = stem.removesuffix(suffix)
        return stem or "data"

    def uri(self) -> str:
        """The source as written, with the revision when it has one."""
        if self.is_hub:
            return f"{self.kind}://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        return self.raw


def _hub(kind: str, rest: str, raw: str, setting: str, revision: str | None) -> Source:
    repo, _, rev = rest.strip().partition("@")
    repo = repo.strip("/")
    if not _HUB_ID.match(repo) or ".." in repo.split("/"):
        raise ConfigError(f"{setting}='{raw}': a {kind} id is owner/name (optionally @revision), "
                          f"e.g. {kind}://Qwen/Qwen2.5-1.5B; got '{repo or '(nothing)'}'")
    if rev and not _REVISION.match(rev):
        raise ConfigError(f"{setting}='{raw}': '{rev}' is not a revision (a branch, tag or commit)")
    if rev and revision and rev != revision:
        raise ConfigError(f"{setting}='{raw}' names revision '{rev}' but the config's revision is '{revision}'")
    return Source(kind, raw, repo_id=repo, revision=rev or revision)  # type: ignore[arg-type]


def _scheme(raw: str) -> tuple[str, str]:
    scheme, sep, rest = raw.partition("://")
    return (scheme.lower(), rest) if sep else ("", raw)


@functools.lru_cache(maxsize=64)  # parsed once per run however many stages ask (a Source is immutable)
def parse_data_source(raw: str, *, revision: str | None = None, setting: str = "data.source") -> Source:
    raw = raw.strip()
    if raw in BUNDLED_ALIASES:
        return Source("bundled", raw)
    scheme, rest = _scheme(raw)
    if scheme in HUBS:
        return _hub(scheme, rest, raw, setting, revision)
    if scheme in ("", "file"):
        return Source("local", raw, path=Path(rest).expanduser())
    raise ConfigError(f"{setting}='{raw}': unsupported scheme '{scheme}://' (use modelscope://owner/name, "
                      "hf://owner/name, a local .jsonl/.json/.parquet/.csv file, or 'sample')")


@functools.lru_cache(maxsize=64)
def parse_model_source(raw: str, *, revision: str | None = None, setting: str = "model.source") -> Source:
    raw = raw.strip()
    scheme, rest = _scheme(raw)
    if scheme in HUBS:
        return _hub(scheme, rest, raw, setting, revision)
    if scheme == "tiny":
        return Source("tiny", raw)
    if scheme == "gguf" or (scheme in ("", "file") and rest.lower().endswith(".gguf")):
        if not rest.strip():
            raise ConfigError(f"{setting}='{raw}': gguf:// needs a file, e.g. gguf:///abs/model.gguf")
        return Source("gguf", raw, path=Path(rest).expanduser())
    if scheme in ("", "file"):
        return Source("local", raw, path=Path(rest).expanduser())
    raise ConfigError(f"{setting}='{raw}': unsupported scheme '{scheme}://' (use modelscope://owner/name, "
                      "hf://owner/name, tiny://, a local model folder or a local .gguf file)")
