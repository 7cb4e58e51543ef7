"""Where a backbone's weights come from: a pretrained tag, a local checkpoint, or random init.

Why a module of its own: the weights decide the metadata ``weights`` tag (``openai``,
``imagenet``, ``sha256:<hex>`` of a local file, ``random``), and fetching pretrained CLIP weights
must fail *fast* and clearly on an offline workstation (open_clip's own download retries for
minutes before giving up). So we look in the Hugging Face cache first, then probe the hub with a
short socket timeout, and only then download.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from musc_edge.core.errors import InputError, ModelError
from musc_edge.core.meta import RANDOM_WEIGHTS

from .backbones import BackboneSpec

#: Seconds to wait for the weights host before declaring the machine offline.
PROBE_TIMEOUT_S = 5.0
#: open_clip's file names on the Hugging Face hub, preferred first.
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class WeightsChoice:
    """The resolved ``--weights`` value.

    kind: ``pretrained`` (the spec's tag, fetched by the family builder), ``file`` or ``random``.
    tag: what the metadata records.
    path: the checkpoint for ``file``.
    """

    kind: str
    tag: str
    path: Path | None = None

    @property
    def is_random(self) -> bool:
        return self.kind == "random"


def resolve_weights(spec: BackboneSpec, text: str | None) -> WeightsChoice:
    """Turn ``--weights`` into a :class:`WeightsChoice` (default: the spec's pretrained tag)."""
    value = spec.weights if text is None else text.strip()
    if value == RANDOM_WEIGHTS:
        return WeightsChoice("random", RANDOM_WEIGHTS)
    if value == spec.weights:
        return WeightsChoice("pretrained", spec.weights)
    path = Path(value).expanduser()
    if path.is_file():
        return WeightsChoice("file", f"sha256:{sha256_file(path)}", path)
    if path.exists():
        raise InputError(f"--weights {value}: not a file; give a checkpoint file")
    raise InputError(f"--weights {value!r} is neither {spec.weights!r}, 'random' nor an existing checkpoint "
                     f"file for {spec.name}; pass --weights PATH to a local checkpoint")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_state_dict(path: Path) -> dict[str, Any]:
    """Read a checkpoint into a flat ``{name: tensor}`` dict.

    Accepts ``.safetensors``, a pickled state dict (``.pt``/``.pth``/``.bin``, also wrapped in
    ``{"state_dict": ...}`` with ``module.`` prefixes as training scripts save it) and OpenAI's
    TorchScript CLIP archives. Anything else is a :class:`ModelError` naming the file.
    """
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except RuntimeError as e:
                if "TorchScript" not in str(e) and "torch.jit.load" not in str(e):
                    raise
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad checkpoint for the user
        raise ModelError(f"cannot read checkpoint {path}: {type(e).__name__}: {_first_line(e)}; "
                         "expected a state dict (.pt/.pth/.bin/.safetensors)") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint {path} holds no state dict of tensors; expected an open_clip or "
                         "EfficientNet-Lite state dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def fetch_clip_checkpoint(spec: BackboneSpec, tag: str, timeout: float = PROBE_TIMEOUT_S) -> Path:
    """Local path of open_clip's ``tag`` weights for ``spec.arch``: cache, else a guarded download.

    Offline (``HF_HUB_OFFLINE`` set, or the hub unreachable within ``timeout`` seconds) this
    raises a one-line :class:`ModelError` that names ``--weights PATH`` instead of retrying.
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.arch, tag)
    hub = cfg.get("hf_hub", "") if cfg else ""
    if not hub:
        raise ModelError(f"open_clip has no {tag!r} weights for {spec.arch}; use --weights PATH or --weights random")
    repo_id, filename = os.path.split(hub)  # "org/model/" -> ("org/model", ""): open_clip's default names
    files = (filename,) if filename else HF_WEIGHT_FILES

    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    for name in files:
        cached = try_to_load_from_cache(repo_id, name)
        if isinstance(cached, str) and os.path.isfile(cached):
            return Path(cached)

    hint = (f"export offline with --weights PATH (a local copy of {files[0]} from huggingface.co/{repo_id}, "
            f"or any open_clip {spec.arch} checkpoint), or --weights random for a smoke test")
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE or constants.HF_HUB_OFFLINE:
        raise ModelError(f"the {tag} weights of {spec.name} are not cached and HF_HUB_OFFLINE is set; {hint}")
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    reason = _unreachable(endpoint, timeout)
    if reason:
        raise ModelError(f"cannot download the {tag} weights of {spec.name}: {endpoint} unreachable ({reason}); {hint}")
    last: Exception | None = None
    for name in files:
        try:
            return Path(hf_hub_download(repo_id, name, endpoint=endpoint, etag_timeout=timeout))
        except Exception as e:  # noqa: BLE001 - try the next file name, report the last failure
            last = e
    raise ModelError(f"downloading the {tag} weights of {spec.name} from {repo_id} failed "
                     f"({type(last).__name__}: {_first_line(last)}); {hint}")


def _unreachable(url: str, timeout: float) -> str:
    """Empty string when a TCP connection to ``url``'s host opens within ``timeout``, else why not."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def _first_line(e: BaseException | None) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""
