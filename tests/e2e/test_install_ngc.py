"""The NGC install tried as the image does it: ``pip install -e .`` under the image's
``PIP_CONSTRAINT``, in an environment shaped like ``nvcr.io/nvidia/pytorch:26.06-py3``, offline.

Since 25.03 the NGC PyTorch images set ``PIP_CONSTRAINT=/etc/pip/constraint.txt``, a file
pinning every Python package the image was built with, so that ``pip install`` cannot replace
the image's torch, Transformer Engine or apex. This test builds such an image in miniature:

- a "container" environment holding stand-ins (metadata, no code) of the image's own builds,
  torch ``2.13.0a0+8145d630e8.nv26.06``, transformer_engine and apex (``IMAGE_BUILDS``), and
  of other packages such an image ships (``IMAGE_SHIPS``), with a constraint file in the image's
  style pinning everything installed in it;
- a local package index (``--find-links``, no network) holding a stand-in of every distribution
  of this checkout's environment with its real name, version and requirement metadata (so
  megatron-core 0.19.2 with its real ``training`` extra, transformers, wandb, ... and torch
  2.11.0 from PyPI, which the constraint must keep out), plus the real setuptools, wheel and
  packaging for the isolated build of the project.

Then it runs the docs' command (docs/launching.md, "Installing on a cluster"): ``pip install -e
<repo>`` with ``PIP_CONSTRAINT`` set as the image sets it; and the docs' remedy for a pin that
conflicts with a requirement (here the image's packaging pinned below megatron-core's
``packaging>=24.2``): clear the image's constraint file and constrain torch, TE and apex alone.

Assumptions, not measured in a container: the 26.06 versions of torch (public run records name
``2.13.0a0+8145d630e8.nv26.06`` with CUDA 13.3), of TE and apex; which other packages the image
ships; the image's pip (this environment's pip runs for it, ``pip --python``).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The image's own builds (stand-ins). NGC's torch carries no nvidia-* or triton requirement.
IMAGE_BUILDS = {
    "torch": (
        "2.13.0a0+8145d630e8.nv26.06",
        ["filelock", "typing-extensions>=4.10.0", "setuptools", "sympy>=1.13.3",
         "networkx>=2.5.1", "jinja2", "fsspec>=0.8.5"],
    ),
    "transformer_engine": ("2.16.0+4220403e", []),
    "apex": ("0.1", []),
}  # fmt: skip
# Other packages such an image ships, at this environment's versions (a subset: what an NGC
# PyTorch image is known to carry that megatron-edl's requirements also reach).
IMAGE_SHIPS = (
    "numpy", "packaging", "pyyaml", "tqdm", "setuptools", "typing_extensions", "sympy", "mpmath",
    "networkx", "jinja2", "markupsafe", "filelock", "fsspec", "pillow", "psutil", "protobuf",
    "requests", "urllib3", "idna", "certifi", "charset-normalizer", "six", "python-dateutil",
)  # fmt: skip
# Real (pure-Python) wheels repacked from this environment: the project's isolated build
# (setuptools>=77, wheel) runs them.
REAL = ("setuptools", "packaging")
OLD_PACKAGING = "23.2"  # an image pin below megatron-core 0.19's packaging>=24.2
PIP_TIMEOUT_S = 300


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _write_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A py3-none-any wheel of ``files`` (paths inside the wheel) plus its WHEEL and RECORD."""
    info = f"{_wheel_name(name)}-{version}.dist-info"
    files = {path: data for path, data in files.items() if not path.startswith(f"{info}/RECORD")}
    files.setdefault(
        f"{info}/WHEEL",
        b"Wheel-Version: 1.0\nGenerator: megatron-edl-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    )
    rows = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append([path, f"sha256={digest}", str(len(data))])
    rows.append([f"{info}/RECORD", "", ""])
    record = io.StringIO()
    csv.writer(record, lineterminator="\n").writerows(rows)
    wheel = folder / f"{_wheel_name(name)}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{info}/RECORD", record.getvalue())
    return wheel


def _metadata(name: str, version: str, requires: list[str], headers: str = "") -> bytes:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", headers.rstrip()]
    lines += [f"Requires-Dist: {r}" for r in requires]
    return ("\n".join(line for line in lines if line) + "\n").encode()


def _standin(folder: Path, dist: importlib.metadata.Distribution) -> Path:
    """A wheel with ``dist``'s name, version and requirement headers, and no code."""
    name, version = dist.metadata["Name"], dist.version
    head = dist.read_text("METADATA").split("\n\n", 1)[0]
    keep = ("Requires-Dist:", "Requires-Python:", "Provides-Extra:")
    headers = "\n".join(line for line in head.splitlines() if line.startswith(keep))
    info = f"{_wheel_name(name)}-{version}.dist-info"
    metadata = _metadata(name, version, [], headers)
    return _write_wheel(folder, name, version, {f"{info}/METADATA": metadata})


def _repack(folder: Path, root: Path, info_dir: str) -> Path:
    """The installed distribution ``root/info_dir`` as a wheel again (its RECORD's files)."""
    name, version = info_dir.removesuffix(".dist-info").rsplit("-", 1)
    files = {}
    with open(root / info_dir / "RECORD", newline="") as f:
        for path, *_ in csv.reader(f):
            top = path.split("/", 1)[0]
            if top in ("..", "bin") or "__pycache__" in path:
                continue
            if path.endswith(("/INSTALLER", "/REQUESTED", "/direct_url.json")):
                continue
            if (root / path).is_file():
                files[path] = (root / path).read_bytes()
    return _write_wheel(folder, name, version, files)


def _build_index(folder: Path) -> None:
    folder.mkdir()
    site = Path(importlib.metadata.distribution("setuptools").locate_file(""))
    skip = {_norm(n) for n in ("megatron-edl", "pip", *REAL)}
    for dist in importlib.metadata.distributions():
        if _norm(dist.metadata["Name"]) not in skip:
            _standin(folder, dist)
    for name in REAL:
        dist = importlib.metadata.distribution(name)
        _repack(folder, site, f"{_wheel_name(name)}-{dist.version}.dist-info")
    vendor = site / "setuptools" / "_vendor"  # setuptools vendors the wheel distribution
    (wheel_info,) = vendor.glob("wheel-*.dist-info")
    _repack(folder, vendor, wheel_info.name)
    for name, (version, requires) in IMAGE_BUILDS.items():
        info = f"{_wheel_name(name)}-{version}.dist-info"
        marker = f"{name}/NGC_BUILD"  # a file of the image's build, checked after the install
        _write_wheel(folder, name, version, {
            f"{info}/METADATA": _metadata(name, version, requires),
            f"{name}/__init__.py": f"__version__ = {version!r}\n".encode(),
            marker: f"{name} {version} built for nvcr.io/nvidia/pytorch:26.06-py3\n".encode(),
        })  # fmt: skip
    _write_wheel(folder, "packaging", OLD_PACKAGING, {
        f"packaging-{OLD_PACKAGING}.dist-info/METADATA": _metadata("packaging", OLD_PACKAGING, [])
    })  # fmt: skip


def _pip_env(index: Path, constraint: Path | None) -> dict[str, str]:
    """This machine's pip settings removed; offline with ``index``; the image's constraint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index),
        PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1",
    )  # fmt: skip
    if constraint is not None:
        env["PIP_CONSTRAINT"] = str(constraint)  # ENV PIP_CONSTRAINT=/etc/pip/constraint.txt
    return env


def _pip(container: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The image's ``pip ...`` (this environment's pip, run for the container's python)."""
    cmd = [sys.executable, "-m", "pip", "--python", str(container / "bin" / "python"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)


def _installed(container: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    out = subprocess.run([str(container / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, timeout=60, check=True).stdout  # fmt: skip
    return {_norm(k): v for k, v in json.loads(out).items()}


def _marker_files(container: Path) -> dict[str, str]:
    site = next((container / "lib").glob("python3*/site-packages"))
    return {name: (site / name / "NGC_BUILD").read_text() for name in IMAGE_BUILDS}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """(container, index, constraint file): the image's packages installed and pinned."""
    root = tmp_path_factory.mktemp("ngc")
    index, container = root / "index", root / "container"
    _build_index(index)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(container)], check=True,
                   timeout=120)  # fmt: skip
    ships = [f"{n}=={importlib.metadata.version(n)}" for n in IMAGE_SHIPS]
    builds = [f"{n}=={v}" for n, (v, _) in IMAGE_BUILDS.items()]
    done = _pip(container, _pip_env(index, None), "install", "--no-deps", "--quiet", *builds,
                *ships)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    constraint = root / "etc" / "pip" / "constraint.txt"
    constraint.parent.mkdir(parents=True)
    constraint.write_text("".join(f"{n}=={v}\n" for n, v in sorted(_installed(container).items())))
    return container, index, constraint


def test_the_docs_install_keeps_the_images_torch_te_and_apex(image):
    container, index, constraint = image
    before, files_before = _installed(container), _marker_files(container)
    assert before["torch"] == "2.13.0a0+8145d630e8.nv26.06"
    # docs/launching.md: `pip install -e /path/to/megatron-edl`, under the image's constraint.
    done = _pip(container, _pip_env(index, constraint), "install", "-e", str(REPO))
    assert done.returncode == 0, done.stdout + done.stderr
    after = _installed(container)
    for name, version in before.items():  # every package of the image, torch/TE/apex included
        assert after[name] == version, (name, version, after[name])
    assert _marker_files(container) == files_before  # not reinstalled either
    assert after["megatron-edl"] and after["megatron-core"] == "0.19.2"
    for extra in ("transformers", "accelerate", "wandb", "omegaconf", "tokenizers"):
        assert extra in after, extra  # megatron-core[training] and our own requirements
    assert "nvidia-nccl-cu13" not in after and "triton" not in after  # PyPI torch's, not pulled
    check = _pip(container, _pip_env(index, None), "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_conflicting_pin_stops_pip_and_the_documented_remedy_keeps_torch(image):
    container, index, constraint = image
    # The image as shipped with an older packaging than megatron-core 0.19 needs (>= 24.2).
    old = _pip(container, _pip_env(index, None), "install", "--no-deps", "--quiet",
               f"packaging=={OLD_PACKAGING}")  # fmt: skip
    assert old.returncode == 0, old.stderr
    pins = constraint.read_text()
    pinned = re.sub(r"(?m)^packaging==.*$", f"packaging=={OLD_PACKAGING}", pins)
    constraint.write_text(pinned)
    report_file = constraint.parent / "report.json"
    report = ("install", "--dry-run", "--report", str(report_file), "-e", str(REPO))
    stopped = _pip(container, _pip_env(index, constraint), *report)
    assert stopped.returncode != 0
    said = stopped.stdout + stopped.stderr
    assert "ResolutionImpossible" in said, said
    assert re.search(r"megatron-core 0\.19\.2 depends on packaging>=24\.2", said), said
    assert f"packaging=={OLD_PACKAGING}" in said, said
    # The remedy (docs/launching.md): the image's file cleared, torch, TE and apex kept pinned.
    listed = _pip(container, _pip_env(index, None), "list", "--format=freeze")
    keep = [
        line for line in listed.stdout.splitlines()
        if re.match(r"(?i)(torch|transformer[-_]engine|apex)==", line)
    ]  # fmt: skip
    assert len(keep) == 3, listed.stdout
    keep_file = constraint.parent / "keep.txt"
    keep_file.write_text("\n".join(keep) + "\n")
    planned = _pip(container, _pip_env(index, keep_file), *report)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    changes = {
        _norm(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report_file.read_text())["install"]
    }
    assert changes.get("packaging") == importlib.metadata.version("packaging")
    assert not {"torch", "transformer-engine", "apex"} & set(changes), changes
