"""Pretrained weights from a local file (``model.pretrained_file``): any common layout, refused in one line naming the
file and the first mismatched keys when it does not fit the architecture; a head of another shape is re-initialised."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from animl_lightning.core.errors import InputFileError

log = logging.getLogger(__name__)


class PretrainedWeightsError(InputFileError):
    """Pretrained weights cannot be obtained (hub download failed) or loaded."""


class PretrainedFileError(PretrainedWeightsError):
    """A ``model.pretrained_file`` cannot be read or does not fit the architecture."""


def load_pretrained_file(model: nn.Module, path: str | Path) -> None:
    """Load backbone weights from a local file into a timm ``model``, keeping a head of another shape as built.

    Accepts ``.safetensors``, a plain state dict, a Lightning checkpoint (``state_dict`` with ``model.`` prefixes)
    or the old pipeline's ``{"model": state_dict}``; torch files are read with ``weights_only=True``.

    Raises:
        PretrainedFileError: naming the file and the first mismatched keys when it does not fit the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedFileError(f"model.pretrained_file {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt files raise many types (pickle, zip, safetensors, unpickler refusals)
        raise PretrainedFileError(f"model.pretrained_file {path}: cannot read weights: {err}") from err
    state = _unwrap_state_dict(raw, path)

    own = model.state_dict()
    head_prefixes = _head_prefixes(model)

    def is_head(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in head_prefixes)

    shape_mismatch = [
        f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape) and not is_head(k)
    ]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not is_head(k) and not k.endswith("num_batches_tracked")]
    if shape_mismatch or unexpected or missing:
        details = []
        if shape_mismatch:
            details.append(f"{len(shape_mismatch)} shape mismatches, e.g. {shape_mismatch[:5]}")
        if missing:
            details.append(f"{len(missing)} keys missing from the file, e.g. {missing[:5]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys in the file, e.g. {unexpected[:5]}")
        raise PretrainedFileError(
            f"model.pretrained_file {path} does not fit {type(model).__name__} "
            f"({getattr(model, 'pretrained_cfg', {}).get('architecture', '?')}): " + "; ".join(details)
        )
    dropped = [k for k, v in state.items() if is_head(k) and tuple(v.shape) != tuple(own[k].shape)]
    kept = {k: v for k, v in state.items() if k not in dropped}
    model.load_state_dict(kept, strict=False)
    if dropped:
        log.info("loaded %s; re-initialised head (%s) for the new label count", path, ", ".join(dropped))
    else:
        log.info("loaded %s", path)


def _unwrap_state_dict(raw: object, path: Path) -> dict[str, Tensor]:
    if isinstance(raw, Mapping):
        for key in ("state_dict", "model", "state_dict_ema"):
            nested = raw.get(key)
            if isinstance(nested, Mapping) and nested and all(isinstance(v, Tensor) for v in nested.values()):
                raw = nested
                break
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, Tensor) for v in raw.values()):
        raise PretrainedFileError(f"model.pretrained_file {path}: expected a state dict of tensors")
    state = {str(k): v for k, v in raw.items()}
    for prefix in ("model.", "module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _head_prefixes(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier", "classifier")
    return [classifier] if isinstance(classifier, str) else [str(c) for c in classifier]
