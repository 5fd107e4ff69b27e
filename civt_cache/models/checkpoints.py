"""Teachers from ``ARCH:CHECKPOINT``: any timm classifier (ours included), weights from a local file.

A checkpoint is read in three steps, each of which a user's file may need:
1. **File format**: ``.safetensors``, or a ``torch.save`` file (``.pth``/``.pt``/``.bin``/...);
   a Hugging Face-style folder is its ``model.safetensors``, with the ``config.json`` beside
   it as metadata (architecture, classes, normalisation).
2. **Wrapper**: a plain state dict, or one inside ``{"state_dict" | "model" | "model_state" |
   "model_ema" | "state_dict_ema": ...}`` (the first present, in that order); DDP's ``module.``
   prefix is dropped. Non-tensor entries beside it (``train-teacher``'s arch, classes, image
   size, normalisation) are kept as metadata.
3. **Key layout**: the keys as timm names them, or a known foreign layout that is tried only when
   every key is in it: the mmcls RedNet release (``backbone.*`` + ``head.fc.*``) and the official
   co-advise teacher wrapper (``model.*`` + ``classifier.*``). The layout whose keys equal the
   model's is used; a file that fits none is refused naming the missing and unexpected keys.
The class count comes from the metadata or from the classifier's weight under timm's name for
it (``fc``, ``head.fc``, ``head``, ``classifier``...), so no flag is needed for it.
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from civt_cache.errors import CheckpointError, ConfigError

_WRAPPERS = ("state_dict", "model", "model_state", "model_ema", "state_dict_ema")
_EMA_WRAPPERS = ("state_dict_ema", "model_ema")
#: Classes a checkpoint may hold besides tensors and plain data, that load without running code:
#: timm's train.py stores its arguments as an ``argparse.Namespace`` (an attribute bag).
SAFE_CLASSES = (argparse.Namespace,)
_OPTIONAL_BUFFERS = ("num_batches_tracked",)  # older checkpoints (mmcls, torch < 0.4.1) lack them


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


#: What torch's own checkpoints name in their pickles (tensor rebuilds, storages, OrderedDict),
#: and ``SAFE_CLASSES``: loaded by ``weights_only``; anything else names code.
_PLAIN_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset",
                  "builtins.slice", "builtins.complex", "numpy.",
                  *(f"{c.__module__}.{c.__qualname__}" for c in SAFE_CLASSES))


def load_torch_file(path: Path) -> Any:
    """``torch.load`` of a file a user can swap, as tensors and plain data only
    (``weights_only=True``): a file that would need to run code to load (a crafted pickle) is
    refused, never run; a truncated or damaged one is named in one line."""
    try:
        with torch.serialization.safe_globals(list(SAFE_CLASSES)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        code = found.group(1) if found else pickle_callables(path)
        if code:  # the file asks to call or build something: never done
            raise CheckpointError(f"{path}: refused: it holds {code}, which would run code on "
                                  "loading, not only tensors and plain data") from None
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or damaged") from None
    except Exception as e:  # truncated zips, foreign formats: many library-specific errors
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or damaged "
                              f"({type(e).__name__}: {_first_line(e)})") from None


def pickle_callables(path: Path) -> str | None:
    """The first callable a pickle file names (``module.name``: what loading it would import
    and call), read from its opcodes without running any (a plain pickle, or the ``data.pkl``
    of torch's zip format); None when it names none or cannot be read."""
    try:
        data = Path(path).read_bytes()
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                data = z.read(name)
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found = str(arg).replace(" ", ".")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found = f"{strings[-2]}.{strings[-1]}"
            else:
                if isinstance(arg, str):
                    strings.append(arg)
                continue
            if not found.startswith(_PLAIN_GLOBALS):
                return found
    except Exception:  # noqa: BLE001 - damaged bytes: the caller names the file as damaged
        return None
    return None


def _hf_config(path: Path) -> dict[str, Any]:
    """What a Hugging Face-style ``config.json`` (timm's export) says of the weights beside it:
    architecture, classes, normalisation; nothing when there is none."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable config.json ({e})") from None
    cfg = config.get("pretrained_cfg") or {}
    meta = {"arch": config.get("architecture"), "num_classes": config.get("num_classes"),
            "mean": cfg.get("mean"), "std": cfg.get("std"), "input_size": cfg.get("input_size")}
    return {k: v for k, v in meta.items() if v is not None}


def recorded_img_size(meta: dict[str, Any]) -> tuple[int | None, str]:
    """The image size a checkpoint's model was trained at, as its file records it, and where:
    ours (``img_size``), timm train.py's arguments (``args.img_size``, else ``args.input_size``),
    or a Hugging Face ``config.json`` (``pretrained_cfg.input_size``); (None, "") when none does.
    A model's default cfg says what its *architecture* was made for, not what these weights saw
    (a 32 px teacher scored at its cfg's 176 px reads 9.67% for 59.67%)."""
    args = meta.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    for value, where in ((meta.get("img_size"), "its img_size"), (args.get("img_size"), "its args.img_size"),
                         (_last(args.get("input_size")), "its args.input_size"),
                         (_last(meta.get("input_size")), "config.json's input_size")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, where
    return None, ""


def _last(size: Any) -> Any:
    """The last of an ``input_size`` (C, H, W) list, or None."""
    return size[-1] if isinstance(size, (list, tuple)) and len(size) == 3 else None


def load_checkpoint_file(path: str | Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict as stored, unwrapped and without ``module.``, metadata) from any accepted
    file; with ``ema``, its EMA weights (``state_dict_ema`` or ``model_ema``, as timm's
    train.py and others save them). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path))
        except Exception as e:  # corrupt or foreign files fail in many library-specific ways
            raise ConfigError(f"{path}: cannot read checkpoint ({type(e).__name__}: {_first_line(e)})") from None
        raw.update(_hf_config(path.parent / "config.json"))
    else:
        raw = load_torch_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: checkpoint holds a {type(raw).__name__}, not a state dict")
    meta = {k: v for k, v in raw.items() if not isinstance(v, (dict, torch.Tensor))}
    if isinstance(raw.get("args"), dict):  # a training script's arguments saved as a dict
        meta["args"] = raw["args"]
    if ema and not any(isinstance(raw.get(k), dict) for k in _EMA_WRAPPERS):
        raise ConfigError(f"{path}: holds no EMA weights ({' or '.join(_EMA_WRAPPERS)}); drop ':ema' to "
                          "use its plain weights")
    for key in _EMA_WRAPPERS if ema else _WRAPPERS:
        if isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    sd = {k.removeprefix("module."): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ConfigError(f"{path}: no tensors found in checkpoint")
    return sd, meta


def _prefix_layout(body: str, head: str) -> Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor] | None]:
    """A foreign layout: backbone keys under ``body``, classifier keys under ``head``. Returns a
    mapper to timm's names (classifier renamed to the model's), or None when any key is outside
    the layout, so a timm model that happens to own such a prefix is never renamed."""
    def remap(sd: dict[str, torch.Tensor], classifier: str) -> dict[str, torch.Tensor] | None:
        out = {}
        for k, v in sd.items():
            if k.startswith(head):
                out[f"{classifier}.{k[len(head):]}"] = v
            elif k.startswith(body):
                out[k[len(body):]] = v
            else:
                return None
        return out
    return remap


LAYOUTS: dict[str, Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor] | None]] = {
    "timm": lambda sd, classifier: sd,
    "mmcls": _prefix_layout("backbone.", "head.fc."),
    "co-advise": _prefix_layout("model.", "classifier."),
}


def match_layout(sd: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """``sd`` renamed to ``model``'s keys by the first layout in ``LAYOUTS`` that fits exactly;
    otherwise a ConfigError naming the missing and unexpected keys of the closest layout."""
    classifier = classifier_name(model)
    expected = set(model.state_dict())
    best: tuple[int, str, list[str], list[str]] | None = None
    for name, remap in LAYOUTS.items():
        mapped = remap(sd, classifier)
        if mapped is None:
            continue
        missing = sorted(k for k in expected - set(mapped) if not k.endswith(_OPTIONAL_BUFFERS))
        unexpected = sorted(set(mapped) - expected)
        if not missing and not unexpected:
            return mapped
        if best is None or len(missing) + len(unexpected) < best[0]:
            best = (len(missing) + len(unexpected), name, missing, unexpected)
    assert best is not None  # the timm layout always maps
    _, name, missing, unexpected = best
    arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    raise ConfigError(f"{source}: does not fit {arch} in any known key layout "
                      f"({', '.join(LAYOUTS)}); closest ({name}): {len(missing)} missing keys "
                      f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}")


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the module ``get_classifier()`` returns (e.g. 'fc', 'head.fc', 'head')."""
    head = model.get_classifier()  # type: ignore[operator]
    return next(n for n, m in model.named_modules() if m is head)
