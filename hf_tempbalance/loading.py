"""Load a model for diagnostics from a path, a Hub id or a timm name, safely.

Accepted sources (:func:`resolve_model`):

* a local Transformers model directory (``config.json`` with ``model_type``, weights saved by
  ``save_pretrained``) or ``hf:ID`` / a Hub id such as ``gpt2`` (downloads when online);
* a local timm directory (``config.json`` with ``architecture``, as ``timm`` pushes to the Hub),
  a timm model name such as ``resnet18`` or ``timm:NAME`` (random init, or the pretrained weights
  with ``pretrained=True`` when online);
* a state dict in ``.safetensors`` or ``.pt``/``.pth``/``.bin``/``.ckpt`` with an architecture
  hint ``arch``: ``timm:NAME``, ``hf:ID``, a Transformers config directory, or ``tensors`` to read
  the bare weight tensors (see :func:`hf_tempbalance.analysis.analyze_state_dict`).

A training output directory counts as a model directory: the model ``trainer.save_model()``
left in it, else its latest ``checkpoint-N`` (or the one ``checkpoint=`` names).

Offline (``HF_HUB_OFFLINE=1``): a Hub id or timm pretrained weights that are not in the local
cache stop with that said, and with the command that downloads them; never "unknown model".
:func:`resolve_model` also says what was read (:class:`LoadedModel`), e.g. that a timm name
without ``pretrained`` is a random initialisation.

Safety: pickled files are only read with ``torch.load(..., weights_only=True)``, which cannot run
code (a file that needs more is refused, never retried unsafely), and Transformers models never
run code from their repository unless ``trust_remote_code=True``.

Every failure raises :class:`ModelLoadError` with a message that says what to do.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ModelLoadError", "LoadedModel", "resolve_model", "load_state_dict",
           "find_saved_model", "find_checkpoints", "offline_settings", "WEIGHT_SUFFIXES"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# Files `save_pretrained`/`Trainer.save_model`/timm write, in the order they are tried.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# Keys under which training scripts commonly nest the state dict in a checkpoint.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema")
# Environment variables that keep huggingface_hub / transformers off the network, and the values
# huggingface_hub reads as true.
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}
# Exceptions huggingface_hub raises when a file is neither cached nor downloadable.
_CACHE_MISS = ("LocalEntryNotFoundError", "OfflineModeIsEnabled")


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the problem and the fix."""


@dataclass
class LoadedModel:
    """What :func:`resolve_model` read.

    Attributes:
        model: the ``nn.Module`` (eval mode, CPU), or the bare state dict for ``arch="tensors"``.
        source: what was read: a path (a run's checkpoint directory when one was picked), or
            ``timm:NAME`` / ``hf:ID``.
        random_init: the weights are a random initialisation, not trained ones (a timm name
            without ``pretrained``; made with ``torch.manual_seed(RANDOM_INIT_SEED)``).
        note: one line on the choice made, e.g. which checkpoint of a run was read (or None).
    """

    model: Any
    source: str
    random_init: bool = False
    note: str | None = None


def offline_settings(names: tuple[str, ...] = _OFFLINE_VARS) -> list[str]:
    """``["HF_HUB_OFFLINE=1", ...]``: the offline switches that are set (to a true value)."""
    return [f"{n}={os.environ[n]}" for n in names if os.environ.get(n, "").strip().upper() in _TRUE]


def _is_cache_miss(err: BaseException | None) -> bool:
    """Whether ``err`` (or an exception it came from) is huggingface_hub's "not cached, and the
    network may not be used"."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ in _CACHE_MISS:
            return True
        err = err.__cause__ or err.__context__
    return False


def _not_cached(what: str, command: str, settings: list[str], alternative: str) -> ModelLoadError:
    """The offline message: what is missing, which switch is set, the command that fetches it."""
    online = " ".join(s.split("=")[0] + "=0" for s in settings)
    verb = "is" if len(settings) == 1 else "are"
    return ModelLoadError(
        f"{what} not in the local cache, and {' and '.join(settings)} {verb} set. Download it "
        f"once with network access: `{online} {command}`; or {alternative}.")


# ---------------------------------------------------------------------------- state dicts
def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a pickle read with ``weights_only=True``.

    Checkpoints that nest the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped
    and a DDP ``module.`` prefix is removed. Pickled dicts keep their order; safetensors keys
    (stored unordered) come in numeric-aware name order.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"no such file: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # a dependency of hf_tempbalance: a broken install
            raise ModelLoadError("reading .safetensors needs safetensors, a dependency of "
                                 "hf_tempbalance that is missing here: pip install safetensors") from err

        try:
            state = load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise ModelLoadError(f"could not read safetensors file {path}: {err}") from err
        # The format keeps no key order; numeric-aware order puts "layers.10" after "layers.9".
        return _checked_tensors({k: state[k] for k in sorted(state, key=_natural_key)}, path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelLoadError(
            f"refusing to load {path}: it holds pickled Python objects beyond tensors, and "
            "unpickling them could run arbitrary code, so only torch.load(weights_only=True) is "
            "used. Re-save just the weights (torch.save(model.state_dict(), path) or "
            "safetensors.torch.save_file) and try again."
        ) from err
    except Exception as err:
        raise ModelLoadError(f"could not read {path} with torch.load(weights_only=True): "
                             f"{err or type(err).__name__}") from err
    return _checked_tensors(_unwrap_state_dict(obj, path), path)


def _checked_tensors(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Refuse tensors without data; FP8 weights come back in float32, which every eigensolver
    path takes (the spectrum does not depend on the storage format)."""
    out = {}
    for name, tensor in state.items():
        if tensor.is_meta:
            raise ModelLoadError(f"{path}: tensor {name!r} holds no data (saved from a model on the "
                                 "meta device); save the weights of a materialised model")
        if tensor.is_floating_point() and tensor.element_size() == 1:
            tensor = tensor.float()
        out[name] = tensor
    return out


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        for key in _NESTED_KEYS:
            if _is_tensor_dict(obj.get(key)):
                obj = obj[key]
                break
        else:
            # Keep the tensors of a mixed dict (e.g. weights next to a step counter).
            obj = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not _is_tensor_dict(obj):
        raise ModelLoadError(f"{path} holds no state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------- builders
def _timm_model(name: str, *, pretrained: bool = False, num_classes: int | None = None) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ModelLoadError("timm models need timm: pip install 'hf_tempbalance[vision]'") from err
    base = name.split(".")[0]  # "resnet18.a1_in1k" -> "resnet18" (pretrained tag)
    if not timm.is_model(base):
        close = timm.list_models(f"*{base[:6]}*")[:6]
        hint = f"; similar timm names: {', '.join(close)}" if close else ""
        raise ModelLoadError(f"unknown timm model {name!r}{hint}")
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:
        if pretrained and _is_cache_miss(err) and (settings := offline_settings(("HF_HUB_OFFLINE",))):
            raise _not_cached(f"the pretrained weights of timm model {name!r} are",
                              f"hf-tempbalance analyze timm:{name} --pretrained", settings,
                              "drop --pretrained to analyse a random initialisation") from err
        hint = (" Pretrained weights come from the Hugging Face Hub: check the network "
                "connection, or drop --pretrained for a random initialisation." if pretrained else "")
        raise ModelLoadError(f"could not create timm model {name!r} (pretrained={pretrained}): "
                             f"{_first_line(err)}.{hint}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hf_config(source: str, *, trust_remote_code: bool, revision: str | None):
    try:
        from transformers import AutoConfig
    except ImportError as err:
        raise ModelLoadError("Transformers models need transformers: "
                             "pip install 'hf_tempbalance[transformers]'") from err
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as err:
        raise _hf_error(source, err, trust_remote_code, revision) from err


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    """Whether the Hub repo's ``config.json`` is in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:  # not a valid repo id, or no huggingface_hub: nothing cached under it
        return False


def _hf_error(source: str, err: Exception, trust_remote_code: bool,
              revision: str | None = None) -> ModelLoadError:
    text = str(err)
    if "trust_remote_code" in text and not trust_remote_code:
        return ModelLoadError(
            f"{source} needs custom code from its repository; read it first, then pass "
            "--trust-remote-code (trust_remote_code=True) if you trust it.")
    if not os.path.isdir(source):
        settings = offline_settings()
        if settings and (_is_cache_miss(err) or not _hub_cached(source, revision)):
            command = f"hf-tempbalance analyze hf:{source}" + (f" --revision {revision}" if revision else "")
            return _not_cached(f"Hugging Face Hub model {source!r} is", command, settings,
                               "pass a local model directory")
    where = "the local directory" if os.path.isdir(source) else "the Hugging Face Hub"
    return ModelLoadError(f"could not load Transformers model {source!r} from {where}: "
                          f"{_first_line(err)}")


def _hf_class(config: Any):
    """The class named in ``config.architectures`` (keeps the task head), else ``AutoModel``."""
    import transformers

    architectures = getattr(config, "architectures", None) or ()
    for name in architectures:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    # Remote code: the Auto class its auto_map names for the architecture (e.g. AutoModelForCausalLM).
    for auto_name, target in (getattr(config, "auto_map", None) or {}).items():
        if auto_name != "AutoConfig" and str(target).rsplit(".", 1)[-1] in architectures:
            return getattr(transformers, auto_name, transformers.AutoModel)
    return transformers.AutoModel


def _hf_pretrained(source: str, *, trust_remote_code: bool, revision: str | None) -> nn.Module:
    config = _hf_config(source, trust_remote_code=trust_remote_code, revision=revision)
    cls = _hf_class(config)
    try:
        return cls.from_pretrained(source, config=config, trust_remote_code=trust_remote_code,
                                   revision=revision)
    except Exception as err:
        raise _hf_error(source, err, trust_remote_code, revision) from err


def _hf_from_state_dict(arch: str, state: dict[str, torch.Tensor], *, trust_remote_code: bool,
                        revision: str | None) -> nn.Module:
    config = _hf_config(arch, trust_remote_code=trust_remote_code, revision=revision)
    cls = _hf_class(config)
    if cls.__name__ == "AutoModel":
        model = cls.from_config(config, trust_remote_code=trust_remote_code)
    else:
        model = cls(config)
    _load_into(model, state, arch, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _timm_from_state_dict(name: str, state: dict[str, torch.Tensor]) -> nn.Module:
    probe = _timm_model(name)
    num_classes = None
    classifier = (getattr(probe, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(classifier, str) and f"{classifier}.weight" in state:
        # A fine-tuned checkpoint carries its own head size; build the model to match it.
        num_classes = state[f"{classifier}.weight"].shape[0]
    model = _timm_model(name, num_classes=num_classes) if num_classes != probe.num_classes else probe
    _load_into(model, state, f"timm:{name}", strict=True)
    return model


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], arch: str, strict: bool) -> None:
    if not set(model.state_dict()) & set(state):
        raise ModelLoadError(f"none of the checkpoint's {len(state)} tensors belong to architecture "
                             f"{arch}; check --arch.")
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise ModelLoadError(
            f"the weights do not fit architecture {arch}: {str(err).splitlines()[0]} ... "
            "check --arch (the checkpoint's model name and configuration).") from err
    # A missing weight keeps its random init unless it is tied to one that was loaded.
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in state}
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [k for k in result.missing_keys if k in params and id(params[k]) not in loaded]
    if missing:
        warnings.warn(f"{len(missing)} parameter(s) of {arch} are not in the checkpoint and keep "
                      f"their random init: {missing[:5]}{' ...' if len(missing) > 5 else ''}",
                      stacklevel=3)


# ---------------------------------------------------------------------------- entry point
def _looks_like_path(spec: str) -> bool:
    """Absolute/relative paths and weight files; ``org/name`` is left to the Hub."""
    return (spec.startswith(("/", ".", "~")) or spec.endswith(WEIGHT_SUFFIXES)
            or (any(sep in spec for sep in ("/", "\\")) and not _HUB_ID.match(spec)))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(data).__name__}, not the object a model "
                             "config is; restore the file or point at another model")
    return data


def _has_model(d: Path) -> bool:
    return (d / "config.json").is_file() or any((d / f).is_file() for f in _WEIGHT_FILES)


def find_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` directories of a run that hold a model, by ascending N."""
    run = Path(run_dir)
    found = sorted((int(m.group(1)), p) for p in run.glob("checkpoint-*")
                   if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name)) and _has_model(p))
    return [p for _, p in found]


def find_saved_model(run_dir: str | os.PathLike) -> str | None:
    """The model a training run saved: ``run_dir`` itself or its latest ``checkpoint-N``.

    A directory counts when it holds a ``config.json`` (Transformers/timm) or one of
    ``model.safetensors``, ``pytorch_model.bin``, ``model.pt``, ``model.pth``.
    """
    run = Path(run_dir)
    if _has_model(run):
        return str(run)
    checkpoints = find_checkpoints(run)
    return str(checkpoints[-1]) if checkpoints else None


def _pick_checkpoint(run: Path, checkpoint: str | int) -> Path:
    """``run/checkpoint-N`` for ``checkpoint`` = N, ``"checkpoint-N"`` or ``"latest"``."""
    available = find_checkpoints(run)
    names = ", ".join(p.name for p in available) or "none"
    text = str(checkpoint).strip()
    if text == "latest":
        if not available:
            raise ModelLoadError(f"--checkpoint latest: {run} has no checkpoint-N directory with "
                                 "a model in it")
        return available[-1]
    match = re.fullmatch(r"(?:checkpoint-)?(\d+)", text)
    if match is None:
        raise ModelLoadError(f"--checkpoint {text!r}: give a step N (or checkpoint-N, or latest); "
                             f"{run} has: {names}")
    chosen = run / f"checkpoint-{int(match.group(1))}"
    if chosen not in available:
        raise ModelLoadError(f"--checkpoint {text}: {run} has no {chosen.name} with a model in it; "
                             f"it has: {names}")
    return chosen


def resolve_model(
    spec: str,
    *,
    arch: str | None = None,
    pretrained: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    checkpoint: str | int | None = None,
) -> LoadedModel:
    """Load ``spec`` (see the module docstring) in eval mode on the CPU and say what was read: a
    :class:`LoadedModel` whose ``model`` is the ``nn.Module``, or the bare state dict when
    ``arch == "tensors"``.

    Args:
        checkpoint: for a training output directory: the ``checkpoint-N`` to read (N,
            ``"checkpoint-N"`` or ``"latest"``; default: the saved model, else the latest).
    """
    path = Path(os.path.expanduser(spec))
    if checkpoint is not None:
        if not path.is_dir():
            raise ModelLoadError(f"--checkpoint picks a checkpoint-N of a training output "
                                 f"directory, and {spec} is not a directory")
        chosen = _pick_checkpoint(path, checkpoint)
        model = _load_dir(chosen, arch=arch, trust_remote_code=trust_remote_code, revision=revision)
        return LoadedModel(model, str(chosen))
    if spec.startswith("timm:"):
        return _timm_loaded(spec[5:], pretrained)
    if spec.startswith("hf:"):
        return LoadedModel(_hf_pretrained(spec[3:], trust_remote_code=trust_remote_code,
                                          revision=revision).eval(), spec)
    if path.is_dir():
        return _run_or_model_dir(path, arch=arch, trust_remote_code=trust_remote_code,
                                 revision=revision)
    if path.is_file():
        if not spec.endswith(WEIGHT_SUFFIXES):
            raise ModelLoadError(f"{spec} is not a weights file (expected one of {', '.join(WEIGHT_SUFFIXES)})"
                                 " or a model directory")
        return LoadedModel(_from_weights(path, arch, trust_remote_code=trust_remote_code,
                                         revision=revision), str(path))
    if _looks_like_path(spec):
        raise ModelLoadError(f"no such file or directory: {spec}")
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(spec.split(".")[0]):
        return _timm_loaded(spec, pretrained)
    if not _HUB_ID.match(spec):
        raise ModelLoadError(f"unknown model {spec!r}: not a path, a timm model name or a Hub id")
    try:
        import transformers  # noqa: F401
    except ImportError:
        missing = ["transformers (pip install 'hf_tempbalance[transformers]') to read it as a "
                   "Hugging Face Hub id"]
        if timm is None:
            missing.insert(0, "timm (pip install 'hf_tempbalance[vision]') to read it as a "
                              "timm model name")
        raise ModelLoadError(f"{spec} is not a local file or directory; install "
                             f"{' or '.join(missing)}") from None
    try:
        return LoadedModel(_hf_pretrained(spec, trust_remote_code=trust_remote_code,
                                          revision=revision).eval(), f"hf:{spec}")
    except ModelLoadError as err:
        if "not in the local cache" in str(err) or "--trust-remote-code" in str(err):
            raise
        raise ModelLoadError(
            f"unknown model {spec!r}: no such file or directory, not a timm model name, and not "
            f"loadable as a Hugging Face Hub id ({err}). Pass a local model directory, a "
            "weights file with --arch, timm:NAME or hf:ID.") from err


#: Seed of the random initialisation of a timm name without ``pretrained`` (the same numbers
#: every time; the global RNG is left as it was).
RANDOM_INIT_SEED = 0


def _timm_loaded(name: str, pretrained: bool) -> LoadedModel:
    if pretrained:
        return LoadedModel(_timm_model(name, pretrained=True).eval(), f"timm:{name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = _timm_model(name).eval()
    return LoadedModel(model, f"timm:{name}", random_init=True)


def choose_model_dir(path: Path, checkpoint: str | int | None = None) -> tuple[Path, str | None]:
    """The directory whose model ``path`` stands for, and the note saying so (or None): the
    picked ``checkpoint-N``; ``path`` itself when it holds a model; else a training output
    directory's latest checkpoint. One definition for loading and for streaming."""
    if checkpoint is not None:
        return _pick_checkpoint(path, checkpoint), None
    checkpoints = find_checkpoints(path)
    if _has_model(path):
        note = (f"read the model saved in {path}; it also has {len(checkpoints)} checkpoint(s) "
                f"({checkpoints[0].name} .. {checkpoints[-1].name}): --checkpoint N reads one"
                if checkpoints else None)
        return path, note
    if not checkpoints:
        raise ModelLoadError(
            f"found no model in {path}: expected a config.json (a Transformers save_pretrained or "
            f"timm directory), a weights file ({', '.join(_WEIGHT_FILES)}) with --arch, or a "
            "training output directory with checkpoint-N subdirectories")
    chosen = checkpoints[-1]
    note = (f"{path} holds no final model: read {chosen.name}, the latest of its "
            f"{len(checkpoints)} checkpoint(s) (--checkpoint N for another)")
    return chosen, note


def _run_or_model_dir(path: Path, *, arch: str | None, trust_remote_code: bool,
                      revision: str | None) -> LoadedModel:
    """A model directory, or a training output directory whose model is its latest checkpoint."""
    chosen, note = choose_model_dir(path)
    model = _load_dir(chosen, arch=arch, trust_remote_code=trust_remote_code, revision=revision)
    return LoadedModel(model, str(chosen), note=note)


def _load_dir(path: Path, *, arch: str | None, trust_remote_code: bool,
              revision: str | None) -> nn.Module | dict[str, torch.Tensor]:
    config_file = path / "config.json"
    if config_file.is_file():
        cfg = _read_json(config_file)
        if "model_type" in cfg or "auto_map" in cfg:
            return _hf_pretrained(str(path), trust_remote_code=trust_remote_code,
                                  revision=revision).eval()
        if "architecture" in cfg:  # timm's save format
            weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
            if weights is None:
                raise ModelLoadError(f"{path} has a timm config.json but no weights "
                                     f"({' or '.join(_WEIGHT_FILES)})")
            return _timm_from_state_dict(cfg["architecture"], load_state_dict(weights)).eval()
    weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
    if weights is not None:
        return _from_weights(weights, arch, trust_remote_code=trust_remote_code, revision=revision)
    raise ModelLoadError(
        f"found no model in {path}: expected a config.json (a Transformers save_pretrained or timm "
        f"directory) or a weights file ({', '.join(_WEIGHT_FILES)}) with --arch")


def _from_weights(path: Path, arch: str | None, *, trust_remote_code: bool,
                  revision: str | None) -> nn.Module | dict[str, torch.Tensor]:
    if arch is None:
        raise ModelLoadError(
            f"{path} is a bare state dict; say which architecture it belongs to with --arch "
            "timm:NAME, --arch hf:ID, --arch CONFIG_DIR (a Transformers config directory), or "
            "--arch tensors to analyse the weight tensors as they are")
    state = load_state_dict(path)
    if arch == "tensors":
        return state
    if arch.startswith("timm:"):
        return _timm_from_state_dict(arch[5:], state).eval()
    source = arch[3:] if arch.startswith("hf:") else arch
    return _hf_from_state_dict(source, state, trust_remote_code=trust_remote_code,
                               revision=revision).eval()
