"""One check that a model folder can be loaded, shared by evaluation, export, serving and publishing.

It runs before any weights load, so a missing path, a folder that is not a sentence-transformers model or a
truncated ``model.safetensors`` is one clear line instead of a traceback from deep inside a library.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors import safe_open

from trainer.errors import UserError
from trainer.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_model_folder(folder: str | Path, key: str = "model") -> Path:
    """``folder`` when it holds a loadable sentence-transformers model: a config and readable weights."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{key}: {str(folder)!r} does not exist; give a checkpoint folder or a hub id")
    if not folder.is_dir():
        raise UserError(f"{key}: {str(folder)!r} is a file, not a model folder")
    if not (folder / "config.json").is_file() and not (folder / "modules.json").is_file():
        raise UserError(f"{key}: {folder} has no config.json or modules.json; it is not a sentence-transformers model")
    for name in ("config.json", "modules.json"):
        if (folder / name).is_file():
            try:
                json.loads((folder / name).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as error:
                raise UserError(f"{key}: {folder / name} is not valid JSON ({error})") from None
    if (folder / ADAPTER_CONFIG).is_file():
        check_adapter_base(folder, key)
    for weights in (folder / "model.safetensors", folder / ADAPTER_WEIGHTS):
        if not weights.is_file():
            continue
        try:
            with safe_open(str(weights), "pt") as handle:
                names = list(handle.keys())
                if names:
                    handle.get_slice(names[-1])
        except Exception as error:  # safetensors raises several types for truncated or foreign files
            raise UserError(f"{key}: {weights} is not a readable safetensors file ({error})") from None
        if weights.stat().st_size < _declared_size(weights):
            raise UserError(
                f"{key}: {weights} is truncated ({weights.stat().st_size} bytes); re-save or re-download it"
            )
    if (folder / "config.json").is_file() and not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{key}: {folder} has no model weights ({' or '.join(WEIGHT_FILES)})")
    return folder


def check_adapter_base(folder: Path, key: str) -> None:
    """A LoRA checkpoint (``trainer.lora``) needs its adapter weights and the base model its config names."""
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{key}: {folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or (base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir()):
        raise UserError(
            f"{key}: the LoRA adapters in {folder} need their base model {base!r} ({ADAPTER_CONFIG}), which is not "
            "there; restore it, or point base_model_name_or_path at a copy"
        )


def _declared_size(weights: Path) -> int:
    """Header length plus the end of the last tensor's data: the size a complete safetensors file has."""
    with weights.open("rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return 8 + header_size + max(ends, default=0)


def resolve_model(name: str, key: str = "model", revision: str | None = None) -> Path:
    """A local model folder, checked; or the snapshot folder of a hub id (downloaded unless offline)."""
    local = Path(name)
    if local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return check_model_folder(local.expanduser(), key)
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(name, revision=revision)
    except (OSError, ValueError) as error:  # not cached offline, no such repo, invalid id, network
        raise UserError(
            f"{key}: cannot find {name!r} as a folder or a hub model ({type(error).__name__}); offline, run "
            "`make models` or give a checkpoint folder"
        ) from None
    return check_model_folder(snapshot, key)


def read_model_json(name: str, filename: str, revision: str | None = None, key: str = "model") -> dict | list | None:
    """A JSON file of a local model folder or hub repo (only that file is fetched); None when there is none."""
    local = Path(name)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = Path(hf_hub_download(name, filename, revision=revision))
        except EntryNotFoundError as error:  # LocalEntryNotFoundError (offline, not cached) is a subclass
            if isinstance(error, LocalEntryNotFoundError) and filename == "config.json":
                raise _unreadable(name, error, key) from None
            return None
        except (ValueError, OSError) as error:  # bad repo id, repository not found, network
            raise _unreadable(name, error, key) from None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{key}: {path} is not valid JSON ({error})") from None


def _unreadable(name: str, error: Exception, key: str) -> UserError:
    return UserError(
        f"{key}: cannot read config.json of {name!r} ({type(error).__name__}); offline, run `make models` "
        "or give a local sentence-transformers folder"
    )


def model_shape(name: str, revision: str | None = None, key: str = "model") -> tuple[int, int]:
    """(transformer layers, sentence-embedding dim) from the model's config files, without loading weights; a
    LoRA checkpoint (adapters only) has the layers of the base model its ``adapter_config.json`` names."""
    config = read_model_json(name, "config.json", revision, key)
    adapters = read_model_json(name, ADAPTER_CONFIG, revision, key) if config is None else None
    if isinstance(adapters, dict) and adapters.get("base_model_name_or_path"):
        config = read_model_json(adapters["base_model_name_or_path"], "config.json", None, key)
    if not isinstance(config, dict) or "num_hidden_layers" not in config:
        raise UserError(f"{key}: {name!r} has no config.json with num_hidden_layers")
    dim = config.get("hidden_size")
    for module in read_model_json(name, "modules.json", revision, key) or []:
        if module.get("type", "").endswith("Dense"):
            dense = read_model_json(name, f"{module['path']}/config.json", revision, key) or {}
            dim = dense.get("out_features", dim)
    return int(config["num_hidden_layers"]), int(dim)
