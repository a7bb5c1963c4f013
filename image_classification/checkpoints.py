"""Checkpoints: reading, recognizing, loading into a model, and writing, all in one place.

Formats read by :func:`load_checkpoint` (a checkpoint is data, never code: ``torch.load(..., weights_only=True)``
only; numpy scalars and arrays are accepted as data, a file that needs any other class or function is refused):

- ``state_dict``: a bare state_dict (torchvision's weight files, ``torch.save(model.state_dict())``).
- ``release``: the authors' release's (and NVIDIA DLE's) dict ``{'epoch', 'arch', 'state_dict', 'best_prec1',
  'optimizer'}``, its state_dict keys prefixed by ``module.`` (DistributedDataParallel); DLE adds
  ``state_dict_ema``.
- ``pedconv``: this project's own, written by :func:`make_checkpoint` and :func:`save_checkpoint`::

      {'epoch': int (epochs done),
       'arch': {'name': str, 'dynamic': bool, 'wmul': float, 'num_classes': int},
       'state_dict': the model's state_dict, unprefixed,
       'optimizer': optimizer.state_dict() or None,
       'scaler': GradScaler.state_dict() or None,
       'best_prec1': float or None,
       'state_dict_ema': the EMA model's state_dict (unprefixed) or None,
       'rng': {'torch': ByteTensor, 'cuda': [ByteTensor...], 'python': tuple, 'numpy': tuple} or None}

``module.`` (DDP, DataParallel) and ``_orig_mod.`` (torch.compile) prefixes are removed from every state_dict, and
NVIDIA DLE's ResNet names (``layers.0.1.conv2.weight``: their stages are one ``nn.Sequential`` called ``layers``)
become torchvision's (``layer1.1.conv2.weight``), so their checkpoints and ``checkpoint2model.py`` outputs load too;
their optimizer state is matched to this project's parameters by :func:`load_foreign_optimizer_state`.
A checkpoint's architecture is taken from its keys and shapes (:func:`infer_arch`): PEDConv layers are recognized
by their ``attn.fc_share`` weights, so a PEDConv checkpoint builds a PEDConv model without being told; the depth
from the blocks per stage, the width multiplier from the block widths, the classes from ``fc.weight``
(MobileNetV2: ``classifier.1.weight``, EfficientNet: ``classifier.fc.weight``); see :func:`infer_arch`.

Every failure is a :class:`CheckpointError` (a ValueError) with a short message: one line for a missing,
unreadable or refused file, a few lines (truncated lists) for keys or shapes that do not fit the model.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from errors import UserError

from . import efficientnet, mobilenet
from .atomic_files import atomic_path
from .models import (ARCHITECTURES, BasicBlock, Bottleneck, _LAYOUTS, build_model, check_arch, default_image_size,
                     stage_widths)

logger = logging.getLogger(__name__)

PREFIXES = ("module.", "_orig_mod.")
PEDCONV_KEY = ".attn.fc_share.weight"
SHOWN = 3  # names shown per list in a mismatch message


class CheckpointError(UserError):
    """A checkpoint that cannot be read, is refused, or does not fit the model; the message says why."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read. ``arch`` = {'name', 'dynamic', 'wmul', 'num_classes'} (name/wmul may be
    None when the keys do not tell); the other fields are None when the format has no such entry."""

    path: str
    format: str
    state_dict: Dict[str, torch.Tensor]
    arch: Dict[str, Any]
    epoch: Optional[int] = None
    best_prec1: Optional[float] = None
    optimizer: Optional[dict] = None
    scaler: Optional[dict] = None
    state_dict_ema: Optional[Dict[str, torch.Tensor]] = None
    rng: Optional[dict] = None
    extra: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Reading


NUMPY_DATA = ("scalar", "_reconstruct", "ndarray", "dtype")


def _is_numpy_data(name: str) -> bool:
    """True for the numpy names a pickled scalar or array refers to (plain data, no behaviour)."""
    module, _, attr = name.rpartition(".")
    return module.startswith("numpy") and (attr in NUMPY_DATA or (module == "numpy.dtypes" and attr.endswith("DType")))


def _numpy_data_globals() -> list:
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [multiarray.multiarray.scalar, multiarray.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def read_file(path: str, map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with every failure turned into a one-line CheckpointError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        needed = _unsafe_globals(path)
        if not needed:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_first_line(error)})") from None
        code = [name for name in needed if not _is_numpy_data(name)]
        if code:
            raise CheckpointError(
                f"{path}: refused: unpickling it would call {', '.join(code[:SHOWN])}; a checkpoint must be data only "
                "(tensors, numbers, strings, lists, dicts); if you trust the file, load it yourself and re-save its state_dict"
            ) from None
        with torch.serialization.safe_globals(_numpy_data_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error.strerror or error}") from None
    except Exception as error:  # a truncated zip, a foreign file: torch raises many types
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(error).__name__}: {_first_line(error)})") from None


def _unsafe_globals(path: str) -> List[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint: nothing to tell
        return []


def _first_line(error: BaseException) -> str:
    """The informative line of an error: for torch's weights-only errors, the unpickler's own reason."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for index, line in enumerate(lines[:-1]):
        if line.endswith("WeightsUnpickler error:"):
            return lines[index + 1][:200]
    return lines[0][:200] if lines else type(error).__name__


def strip_prefixes(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The state_dict without the ``module.``/``_orig_mod.`` prefixes that wrappers put on every key."""
    keys = list(state_dict)
    changed = True
    while keys and changed:
        changed = False
        for prefix in PREFIXES:
            if all(key.startswith(prefix) for key in keys):
                keys = [key[len(prefix):] for key in keys]
                changed = True
    return dict(zip(keys, state_dict.values()))


NVIDIA_STAGE = re.compile(r"^layers\.(\d+)\.")


def from_nvidia_names(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """NVIDIA DLE's ResNet and EfficientNet keys (``layers.<stage>.<block>.*``, stages from 0) in this project's
    names (``layer<stage + 1>.<block>.*``); any other state_dict is returned as it is. The rest of their ResNet-50
    layout (``conv1``, ``bn1``, blocks' ``conv1..3``/``bn1..3``, ``downsample.0/.1``, ``fc``) is torchvision's
    already, and the rest of their EfficientNets' (``stem``, ``block<j>.expand``...) is this project's."""
    if not any(NVIDIA_STAGE.match(key) for key in state_dict) or any(key.startswith("layer1.") for key in state_dict):
        return state_dict
    return {NVIDIA_STAGE.sub(lambda m: f"layer{int(m.group(1)) + 1}.", key): value for key, value in state_dict.items()}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items()
    )


def load_checkpoint(path: str, map_location="cpu") -> Checkpoint:
    """Read a checkpoint in any of the module's formats; CheckpointError if it is none of them."""
    path = os.fspath(path)
    obj = read_file(path, map_location)
    if _is_state_dict(obj):
        state = from_nvidia_names(strip_prefixes(obj))
        return Checkpoint(path, "state_dict", state, infer_arch(state))
    if not isinstance(obj, dict) or not _is_state_dict(obj.get("state_dict")):
        what = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path}: not a checkpoint: holds {what}, neither a state_dict nor a 'state_dict' entry")
    state = from_nvidia_names(strip_prefixes(obj["state_dict"]))
    arch = infer_arch(state)
    stored = obj.get("arch")
    fmt = "release"
    if isinstance(stored, dict):
        fmt = "pedconv"
        arch.update({key: stored[key] for key in ("name", "wmul", "num_classes") if stored.get(key) is not None})
    elif arch["name"] is None and stored in ARCHITECTURES:
        arch["name"] = stored
    ema = obj.get("state_dict_ema")
    known = {"epoch", "arch", "state_dict", "best_prec1", "optimizer", "scaler", "state_dict_ema", "rng"}
    return Checkpoint(
        path,
        fmt,
        state,
        arch,
        epoch=obj.get("epoch"),
        best_prec1=_as_float(obj.get("best_prec1")),
        optimizer=obj.get("optimizer"),
        scaler=obj.get("scaler"),
        state_dict_ema=from_nvidia_names(strip_prefixes(ema)) if _is_state_dict(ema) else None,
        rng=obj.get("rng"),
        extra={key: value for key, value in obj.items() if key not in known},
    )


def _as_float(value) -> Optional[float]:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


# ----------------------------------------------------------------------------------------------------------------
# Recognizing


def is_pedconv_state(state_dict: Dict[str, Any]) -> bool:
    """True if the state_dict holds PEDConv layers (their gate generators' ``attn.fc_share``)."""
    return any(key.endswith(PEDCONV_KEY) for key in state_dict)


CLASSIFIER_KEYS = ("fc.weight", "classifier.1.weight", "classifier.fc.weight")  # ResNet, MobileNetV2, EfficientNet


def infer_arch(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """{'name', 'dynamic', 'wmul', 'num_classes'} of a state_dict, from its keys and shapes.

    ``name`` and ``wmul`` are None when the keys match none of ``ARCHITECTURES`` (or widths no multiplier gives);
    ``num_classes`` is None without classifier weights (``fc.weight``, MobileNetV2's ``classifier.1.weight``).
    ResNet and ResNeXt of the same depth differ by the groups of their 3x3 convs (``conv2``), SE-ResNeXt has
    ``squeeze`` layers; MobileNetV2 is told by its ``features.*`` and ``classifier.1`` keys, NVIDIA's
    EfficientNets by ``stem.conv`` and ``classifier.fc`` and their blocks per stage.
    """
    state = strip_prefixes(state_dict)
    fc = next((state[key] for key in CLASSIFIER_KEYS if key in state), None)
    arch = {"name": None, "dynamic": is_pedconv_state(state), "wmul": None,
            "num_classes": int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.dim() == 2 else None}
    if "features.0.0.weight" in state and "classifier.1.weight" in state:
        arch["name"] = "mobilenet_v2"
        arch["wmul"] = mobilenet.infer_wmul(state)
        return arch
    found = efficientnet.infer_variant(state)
    if found is not None:
        arch["name"], arch["wmul"] = found
        return arch
    blocks = [0, 0, 0, 0]
    for key in state:
        match = re.match(r"layer([1-4])\.(\d+)\.", key)
        if match:
            stage = int(match.group(1)) - 1
            blocks[stage] = max(blocks[stage], int(match.group(2)) + 1)
    bottleneck = "layer1.0.conv3.weight" in state
    deep_stem = "conv2.weight" in state and "conv3.weight" in state
    conv2 = state.get("layer1.0.conv2.weight")
    groups = int(conv2.shape[0] // conv2.shape[1]) if isinstance(conv2, torch.Tensor) and conv2.dim() == 4 else 1
    se = "layer1.0.squeeze.squeeze.weight" in state
    for name, spec in _LAYOUTS.items():
        if (list(spec.layers) == blocks and (spec.block is Bottleneck) == bottleneck and spec.deep_stem == deep_stem
                and (spec.groups > 1) == (groups > 1) and spec.se == se):
            arch["name"] = name
            arch["wmul"] = _infer_wmul(state, spec)
    return arch


def _infer_wmul(state: Dict[str, torch.Tensor], spec) -> Optional[float]:
    """The smallest width multiplier whose widths (under the release's rules) are the checkpoint's, or None."""
    try:
        widths = [state[f"layer{i}.0.conv1.weight"].shape[0] for i in range(1, 5)]
    except KeyError:
        return None
    # Each stage width bounds wmul to an interval: int(wmul * base) == width (basic blocks) or
    # min(int(wmul * base) + 1, base) == width (bottlenecks; the full width holds for any wmul above).
    low = 0.0
    for width, base in zip(widths, spec.base_widths):
        low = max(low, (width if spec.block is BasicBlock else width - 1) / base)
    # The full model says 1.0, not the smallest multiplier that also gives it; grouped widths are also rounded to
    # a multiple of the groups, which the interval does not see: then the first multiple of 0.01 that fits.
    for candidate in (1.0, low, *(k / 100 for k in range(1, 101))):
        if candidate > 0 and [inner for inner, _ in stage_widths(spec.block, candidate, spec.base_widths,
                                                                 spec.expansion, spec.groups)] == widths:
            return candidate
    return None


# ----------------------------------------------------------------------------------------------------------------
# Loading into a model


def _names(keys: List[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f", ... (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def mismatch_message(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> Optional[str]:
    """None if ``state_dict`` loads into ``model``; else a few lines: missing, unexpected keys, shape differences."""
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict] if strict else []
    unexpected = [key for key in state_dict if key not in own] if strict else []
    shapes = [
        f"{key} {tuple(state_dict[key].shape)} in the checkpoint, {tuple(own[key].shape)} in the model"
        for key in own
        if key in state_dict and tuple(state_dict[key].shape) != tuple(own[key].shape)
    ]
    if not (missing or unexpected or shapes):
        return None
    arch = getattr(model, "arch", None)
    described = ", ".join(f"{k}={v}" for k, v in arch.items()) if isinstance(arch, dict) else type(model).__name__
    lines = [f"checkpoint does not fit the model ({described}):"]
    if missing:
        lines.append(f"  missing in the checkpoint ({len(missing)}): {_names(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {_names(unexpected)}")
    if shapes:
        lines.append(f"  shapes differ ({len(shapes)}): {_names(shapes)}")
    has_pedconv, model_pedconv = is_pedconv_state(state_dict), is_pedconv_state(own)
    if has_pedconv != model_pedconv:
        lines.append(f"  the checkpoint is {'a PEDConv' if has_pedconv else 'a static'} model, the model is "
                     f"{'dynamic' if model_pedconv else 'static'}")
    return "\n".join(lines)


def load_model_state(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """``model.load_state_dict`` after removing wrapper prefixes; CheckpointError (a few lines) on a mismatch."""
    state = from_nvidia_names(strip_prefixes(state_dict))
    message = mismatch_message(model, state, strict)
    if message:
        raise CheckpointError(message)
    model.load_state_dict(state, strict=strict)
    return model


def gate_generator_keys(model: nn.Module) -> List[str]:
    """The state_dict keys of the PEDConv layers' gate generators and info-max decoders (``*.attn.*``): the
    tensors a static model has no counterpart for."""
    from pedconv import PEDConv2d

    prefixes = tuple(f"{name}.attn." for name, module in model.named_modules() if isinstance(module, PEDConv2d))
    return [key for key in model.state_dict() if prefixes and key.startswith(prefixes)]


def load_static_into_pedconv(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Start a PEDConv model from a static one: every static conv weight becomes the PEDConv layer's base kernel
    ``W0`` (both are called ``weight``), every other tensor (stem, BatchNorms with their statistics, shortcuts,
    classifier) is copied as it is, and the gate generators keep the values they have (their initialization).

    Returns the gate-generator keys left as they were. CheckpointError when anything but those keys is missing,
    unexpected or of another shape (e.g. a different depth or width), as :func:`load_model_state` would say.
    """
    state = from_nvidia_names(strip_prefixes(state_dict))
    own = model.state_dict()
    kept = [key for key in gate_generator_keys(model) if key not in state]
    merged = {**state, **{key: own[key] for key in kept}}
    load_model_state(model, merged)
    return kept


def weights_of(checkpoint: Checkpoint, ema: bool = False, allow_nonfinite: bool = False) -> Dict[str, torch.Tensor]:
    """The checkpoint's model weights, or its EMA weights with ``ema`` (an error if it has none). Weights holding
    NaN or infinite values are refused (a CheckpointError naming the first such tensor) unless ``allow_nonfinite``."""
    if not ema:
        state = checkpoint.state_dict
    elif not checkpoint.state_dict_ema:
        raise CheckpointError(f"{checkpoint.path}: --ema asked, but the checkpoint holds no EMA weights "
                              "(train with --use-ema DECAY)")
    else:
        state = checkpoint.state_dict_ema
    if not allow_nonfinite:
        check_finite(state, checkpoint.path, "EMA weights" if ema else "weights")
    return state


def _described(checkpoint: Checkpoint, arch: Optional[str], given: Dict[str, Any]) -> Dict[str, Any]:
    """The architecture to build: the checkpoint's (its keys tell it), ``given``'s values (not None) replacing its
    ``dynamic``, ``num_classes`` and ``wmul``; ``arch``, when given, must be the checkpoint's."""
    described = dict(checkpoint.arch, **{k: v for k, v in given.items() if v is not None})
    if arch is not None:
        check_arch(arch)
        if described.get("name") not in (None, arch):
            raise CheckpointError(f"{checkpoint.path} holds a {described['name']}, not a {arch}")
        described["name"] = arch
    if described.get("name") is None or described.get("wmul") is None:
        raise CheckpointError(f"{checkpoint.path}: cannot tell the architecture from the checkpoint's keys "
                              f"(one of {', '.join(ARCHITECTURES)} is expected)")
    check_arch(described["name"])
    if described.get("num_classes") is None:
        raise CheckpointError(f"{checkpoint.path}: no classifier weights ({' or '.join(CLASSIFIER_KEYS)}) in the "
                              "checkpoint")
    return described


def model_from_checkpoint(checkpoint: Checkpoint, arch: Optional[str] = None, *, dynamic: Optional[bool] = None,
                          num_classes: Optional[int] = None, wmul: Optional[float] = None, ema: bool = False,
                          allow_nonfinite: bool = False, from_static: bool = False, **build_options) -> nn.Module:
    """The one way to make a model from a checkpoint (main.py's run and the tools): the architecture the
    checkpoint's keys tell (:func:`infer_arch`) is built (``build_options`` go to :func:`build_model`) and its
    weights loaded (``ema``: its EMA weights; see :func:`weights_of` for ``allow_nonfinite``). The model is in
    training mode, as built.

    ``arch``, when given, must be the checkpoint's; ``dynamic``, ``num_classes`` and ``wmul``, when given, replace
    the checkpoint's (and the weights must fit). With ``from_static``, a static checkpoint starts a PEDConv model
    (``dynamic=True``): see :func:`load_static_into_pedconv`. A CheckpointError when the architecture cannot be told
    or the weights do not fit it (naming the file and the model)."""
    described = _described(checkpoint, arch, {"dynamic": dynamic, "num_classes": num_classes, "wmul": wmul})
    model = build_model(described["name"], described["dynamic"], described["num_classes"], described["wmul"],
                        **build_options)
    state = weights_of(checkpoint, ema, allow_nonfinite)
    try:
        if from_static and described["dynamic"] and not checkpoint.arch.get("dynamic"):
            kept = load_static_into_pedconv(model, state)
            logger.info("%s is a static model: its conv weights start the PEDConv layers' W0, every other layer is "
                        "copied, and the gate generators (%d tensors) keep their initialization",
                        checkpoint.path, len(kept))
        else:
            load_model_state(model, state)
    except CheckpointError as error:
        raise CheckpointError(f"{checkpoint.path} does not fit {described['name']}"
                              f"{' (PEDConv)' if described['dynamic'] else ''}: {error}") from None
    return model


def checkpoint_classes(checkpoint: Checkpoint) -> Optional[List[str]]:
    """The class names a checkpoint stores (its ``classes`` entry), or None."""
    classes = checkpoint.extra.get("classes")
    if isinstance(classes, (list, tuple)) and all(isinstance(name, str) for name in classes):
        return list(classes)
    return None


DEFAULT_PREPROCESSING = {"image_size": 224, "interpolation": "bilinear"}


def default_preprocessing(arch: Optional[str]) -> dict:
    """DLE's defaults for an architecture: bilinear, and its own crop size (224; efficientnet-b4: 380)."""
    return dict(DEFAULT_PREPROCESSING, image_size=default_image_size(arch))


def checkpoint_preprocessing(checkpoint: Checkpoint, **given) -> dict:
    """``image_size`` and ``interpolation`` for a checkpoint's model: a value given (not None) wins, with a warning
    when it differs from the one the checkpoint records (main.py stores how its images were prepared); otherwise
    the recorded value, else DLE's default for its architecture (:func:`default_preprocessing`)."""
    stored = checkpoint.extra.get("preprocessing")
    stored = stored if isinstance(stored, dict) else {}
    chosen = {}
    for name, default in default_preprocessing(checkpoint.arch.get("name")).items():
        value, recorded = given.get(name), stored.get(name)
        if value is None:
            chosen[name] = recorded if recorded is not None else default
            continue
        if recorded is not None and value != recorded:
            logger.warning("--%s %s overrides the %s the checkpoint's model was trained with (%s): its predictions "
                           "may be wrong", name.replace("_", "-"), value, name.replace("_", " "), recorded)
        chosen[name] = value
    return chosen


OPTIMIZER_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def load_foreign_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, checkpoint: "Checkpoint") -> int:
    """Load the optimizer state of a checkpoint written by NVIDIA DLE's (or the authors' release's) code into
    ``optimizer`` (built for ``model`` by :func:`image_classification.optim.build_optimizer`); returns how many
    parameters got their state.

    Their optimizer numbers parameters in its own groups: the parameters whose name contains "bn", then the others
    (one group with ``--bn-weight-decay``), each in ``named_parameters`` order, which is the order of the
    checkpoint's state_dict without its buffers. That order gives each state entry its parameter name here; an
    entry is kept when the names and the shapes of its tensors match, and the per-parameter state (momentum and
    the like) is loaded while this optimizer keeps its own groups and hyperparameters.
    """
    saved = checkpoint.optimizer
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict) and saved.get("param_groups")):
        return 0
    kind = {"alpha", "centered", "dampening", "nesterov"}  # SGD's group keys, RMSprop's
    if kind & set(saved["param_groups"][0]) != kind & set(optimizer.param_groups[0]):
        return 0  # another optimizer type: its state means something else
    own_params = dict(unwrap(model).named_parameters())
    names = [key for key in checkpoint.state_dict if key in own_params]
    indices = [index for group in saved["param_groups"] for index in group["params"]]
    sizes = [len(group["params"]) for group in saved["param_groups"]]
    with_bn = [name for name in names if "bn" in name]
    orders = [names]
    if sizes == [len(with_bn), len(names) - len(with_bn)]:
        orders.insert(0, with_bn + [name for name in names if "bn" not in name])
    best: Dict[str, Any] = {}
    for order in orders:
        if len(order) == len(indices):
            state = {name: saved["state"][index] for name, index in zip(order, indices) if index in saved["state"]}
            state = {name: entry for name, entry in state.items() if _state_fits(entry, own_params[name])}
            best = state if len(state) > len(best) else best
    number = {id(param): index for index, param in
              enumerate(param for group in optimizer.param_groups for param in group["params"])}
    current = optimizer.state_dict()
    current["state"] = {number[id(own_params[name])]: entry for name, entry in best.items()
                        if id(own_params[name]) in number}
    optimizer.load_state_dict(current)
    return len(current["state"])


def _state_fits(entry: Any, param: torch.Tensor) -> bool:
    """True if every non-scalar tensor of one parameter's optimizer state has the parameter's shape."""
    return isinstance(entry, dict) and all(
        value.shape == param.shape for value in entry.values() if isinstance(value, torch.Tensor) and value.dim() > 0
    )


# ----------------------------------------------------------------------------------------------------------------
# Writing


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel/DataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        for attribute in ("module", "_orig_mod"):
            inner = getattr(model, attribute, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def capture_rng() -> dict:
    """The random generators' states (torch, CUDA, Python, numpy) as checkpoint data (no numpy objects)."""
    import numpy as np

    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)),
    }


def restore_rng(state: dict) -> None:
    """Set the generators from :func:`capture_rng`'s dict (CUDA only when present on both sides)."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))


def make_checkpoint(model: nn.Module, epoch: int, optimizer=None, scaler=None, best_prec1: Optional[float] = None,
                    ema_model: Optional[nn.Module] = None, rng: Optional[dict] = None) -> dict:
    """This project's checkpoint dict (see the module docstring) for ``model`` (wrappers are looked through)."""
    inner = unwrap(model)
    arch = getattr(inner, "arch", None)
    if not isinstance(arch, dict):
        raise TypeError(f"{type(inner).__name__} has no 'arch' description; build it with image_classification.models")
    return {
        "epoch": int(epoch),
        "arch": dict(arch),
        "state_dict": strip_prefixes(inner.state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "best_prec1": None if best_prec1 is None else float(best_prec1),
        "state_dict_ema": strip_prefixes(unwrap(ema_model).state_dict()) if ema_model is not None else None,
        "rng": rng,
    }


class _WriteErrors:
    """A binary stream that remembers the OSError its ``write`` raised: torch.save turns it into a RuntimeError
    ("unexpected pos ...") that no longer says the disk is full."""

    def __init__(self, stream):
        self.stream = stream
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.stream.flush()


def save_checkpoint(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` atomically: written to a temporary file beside ``path``, synced, then renamed, so
    that a crash never leaves a truncated checkpoint under ``path``. A failed write (a full disk) raises the
    OSError itself (e.g. ``[Errno 28] No space left on device``), with the temporary file removed."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream:
            recorder = _WriteErrors(stream)
            try:
                torch.save(obj, recorder)
            except RuntimeError:
                if recorder.error is not None:
                    raise recorder.error from None
                raise
            stream.flush()
            os.fsync(stream.fileno())


# ----------------------------------------------------------------------------------------------------------------
# Checking values


def first_nonfinite(state_dict: Dict[str, Any]) -> Optional[str]:
    """The name of the first floating-point tensor of ``state_dict`` holding a NaN or an infinity, or None."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def check_finite(state_dict: Dict[str, Any], path: str, what: str = "weights") -> None:
    """CheckpointError (one line) naming the first tensor of ``state_dict`` that holds NaN or infinite values."""
    name = first_nonfinite(state_dict)
    if name is not None:
        value = state_dict[name]
        kind = "NaN" if bool(torch.isnan(value).any()) else "infinite"
        raise CheckpointError(f"{path}: refused: {what} tensor {name!r} holds {kind} values (a diverged or damaged "
                              "model)")
