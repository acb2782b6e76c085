"""The stage engine: a keyed folder per stage, `_DONE.json` as the one record of "done", a lock, a code version.

A stage writes into ``<workdir>/<folder>/<key>/`` and finishes by writing ``_DONE.json`` (its
typed result, `sft_core.results`) atomically. A folder that has it is complete and reused as is;
a folder without it is a crash's leftover and is wiped first (unless the stage keeps its partial
work: training resumes from its checkpoints). The key hashes the stage's inputs (digests or the
keys of the stages it reads), the config section it reads, and its code version: a hash of the
source of its body, its key function, its result type and the library modules its body runs,
normalised so that comments, docstrings and formatting do not count.

Generic: nothing here knows which stages the pipeline has (`sft_core.stages` declares them).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from sft_core.config import PipelineConfig, stable_hash
from sft_core.disk import free_space, is_disk_full
from sft_core.errors import StorageError
from sft_core.results import Result

DONE = "_DONE.json"
OWNED = ".qwen-sft-owned"  # written into every folder a stage creates: `qwen-sft gc` deletes nothing else


@dataclass(frozen=True)
class Stage:
    """One stage: `key(cfg, **inputs)` says what its folder key hashes (None: never cached),
    `body(cfg, folder, **inputs, **extras)` does the work and returns the result's fields."""

    name: str
    folder: str
    result: type[Result]
    key: Callable[..., dict[str, Any] | None]
    body: Callable[..., dict[str, Any]]
    modules: tuple[str, ...] = ()  # the library modules its body runs: part of its code version
    # what the body takes besides its inputs, from whoever runs it: `log` (one progress line per step or
    # batch), `sink` (every logged training step, for the tracking store)
    takes: tuple[str, ...] = ()
    keep_partial: bool = False  # a crashed run's files are kept (train: checkpoints to resume from)
    # inside a finished folder, what only a crashed run would have needed (gc frees them: checkpoints)
    resume_points: tuple[str, ...] = ()
    retries: int = 0  # for stages that reach the network; nothing else can heal by retrying

    def code_version(self) -> str:
        """A hash of the normalised source of the body, key function, result type and modules, as this process
        loaded them (computed once per process: a file edited while a run goes on does not relabel its work)."""
        return _code_version(self.body, self.key, self.result, self.modules)

    def key_of(self, cfg: PipelineConfig, **inputs: Any) -> str | None:
        spec = self.key(cfg, **inputs)
        if spec is None:
            return None
        return stable_hash({"stage": self.name, "code": self.code_version(), "inputs": spec}, length=16)

    def folder_of(self, cfg: PipelineConfig, key: str | None) -> Path:
        return cfg.workdir_path / self.folder / (key or "latest")

    def run(self, cfg: PipelineConfig, *, refresh: bool = False, extras: dict[str, Any] | None = None,
            **inputs: Any) -> Result:
        """Run the body unless its folder holds a finished result (always, when the key is None)."""
        key = self.key_of(cfg, **inputs)
        return self.run_into(cfg, self.folder_of(cfg, key), key=key, refresh=refresh or key is None, extras=extras,
                             **inputs)

    def run_into(self, cfg: PipelineConfig, folder: Path, *, key: str | None = None, refresh: bool = False,
                 extras: dict[str, Any] | None = None, **inputs: Any) -> Result:
        """Run the body into `folder` (a command's own output folder, or the keyed one), same rules."""
        return run_in_folder(
            folder, lambda f: self.result(key=key, folder=str(f), **self.body(cfg, f, **inputs, **(extras or {}))),
            self.result, refresh=refresh, keep_partial=self.keep_partial,
        )


def read_done(folder: Path, result: type[Result]) -> Result | None:
    """The finished result in `folder`, or None (not done, unreadable, or written by older code)."""
    marker = folder / DONE
    try:
        return result.from_json(json.loads(marker.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def write_done(folder: Path, result: Result) -> Result:
    tmp = folder / (DONE + ".tmp")
    tmp.write_text(json.dumps(result.to_json(), ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, folder / DONE)
    return result


def run_in_folder(folder: Path, body: Callable[[Path], Result], result: type[Result], *, refresh: bool = False,
                  keep_partial: bool = False) -> Result:
    """`body(folder)` unless the folder already holds a finished result; the result is recorded in _DONE.json.

    A file lock beside the folder makes concurrent runs of the same stage wait for each other: the
    second finds the first's result instead of redoing (or clobbering) it.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if refresh and folder.exists():
            shutil.rmtree(folder)
        done = read_done(folder, result)
        if done is not None:
            done.reused = True
            return done
        if folder.exists() and not keep_partial:
            shutil.rmtree(folder)
        started = time.perf_counter()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / OWNED).write_text("written by qwen-sft: `qwen-sft gc` may delete this folder\n", encoding="utf-8")
            out = body(folder)
            out.seconds = round(time.perf_counter() - started, 3)
            return write_done(folder, out)
        except Exception as exc:
            if is_disk_full(exc):
                raise StorageError(f"no space left on the device of {folder} ({free_space(folder)} free): "
                                   f"{type(exc).__name__}: {str(exc)[:200]}; free some with `qwen-sft gc`, or set "
                                   "workdir on a larger disk") from exc
            raise


# --- code versions: source, normalised ---------------------------------------------------------------------

def _normalised(source: str) -> str:
    """Source without comments, docstrings or formatting: what the code does, not how it reads."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


_AST_LOCK = threading.Lock()  # CPython 3.11's ast is not safe across threads ("recursion depth mismatch")


def _code_version(body: Callable, key: Callable, result: type, modules: tuple[str, ...]) -> str:
    with _AST_LOCK:
        return _code_version_locked(body, key, result, modules)


@functools.cache
def _code_version_locked(body: Callable, key: Callable, result: type, modules: tuple[str, ...]) -> str:
    parts = [_normalised(inspect.getsource(obj)) for obj in (body, key, result)]
    parts += [_module_source(name) for name in modules]
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"stage module {name} not found")
    return _normalised(Path(spec.origin).read_text(encoding="utf-8"))
