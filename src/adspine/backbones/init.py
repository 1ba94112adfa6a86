"""Initialization of registry backbones: pretrained tags, framework-default and named random schemes, local files.

Every choice is recorded (``InitRecord``) because the study compares them. Every pretrained file is read here, never
by torchvision/timm/torch.hub: the model is built without weights, the cached file (downloaded into the same cache
path first when missing and the machine is online) is checked against the hash its name states, read with
safetensors or ``torch.load(weights_only=True)`` (nothing is unpickled) and loaded with a strict key check. When a
file is missing and the machine is offline the build stops at once with one line naming the file.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from adspine.backbones.init_names import (
    INIT_CHOICES,
    RANDOM_SCHEMES,
    InitError,
    OfflineWeightsError,
    parse_init,
)
from adspine.backbones.registry import BackboneSpec, weight_tags
from adspine.backbones.weights import (
    WeightsLocation,
    download,
    is_offline,
    preflight,
    sha256_file,
    verify_cached,
    weights_location,
)

__all__ = ["INIT_CHOICES", "RANDOM_SCHEMES", "InitError", "OfflineWeightsError", "InitRecord", "WeightsLocation",
           "apply_scheme", "build_model", "construct", "is_offline", "load_state_file", "parse_init", "preflight",
           "weights_location"]

#: torchvision's densenet checkpoints keep pre-1.0 names (``norm.1``); its builder renames them, so do we
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


@dataclass
class InitRecord:
    """What initialized a model, for provenance."""

    init: str
    weights_tag: str | None = None
    init_seed: int | None = None
    zero_init_last: bool | None = None
    imagenet_top1: float | None = None
    weights_file: str | None = None
    weights_sha256: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- construction


def _constructor_kwargs(spec: BackboneSpec, zero_init_last: bool | None) -> dict:
    kw = dict(spec.kwargs)
    if spec.zero_init_kw is not None and zero_init_last is not None:
        kw[spec.zero_init_kw] = zero_init_last
    return kw


def _architecture(spec: BackboneSpec, kw: dict) -> nn.Module:
    """The network of ``spec`` with the framework's default init (no pretrained weights are ever requested)."""
    if spec.source == "torchvision":
        import torchvision.models as tvm

        return tvm.get_model(spec.constructor, weights=None, **kw)
    if spec.source == "timm":
        import timm

        return timm.create_model(spec.constructor, pretrained=False, **kw)
    if spec.source == "ibn":
        from adspine.backbones.ibn import build_ibn

        return build_ibn(spec.constructor)
    from adspine.backbones.offline import build_offline

    return build_offline(spec.constructor, pretrained=False)


def construct(spec: BackboneSpec, zero_init_last: bool | None = False, pretrained_tag: str | None = None) -> nn.Module:
    """The architecture of ``spec`` with the framework's default init (or ``pretrained_tag`` loaded safely).

    Built on the current default device, so ``with torch.device("meta"):`` gives a weight-free model.
    """
    if pretrained_tag is not None:
        return _pretrained(spec, pretrained_tag)[0]
    return _architecture(spec, _constructor_kwargs(spec, zero_init_last))


def _rename_densenet(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _with_metadata({(m.group(1) + m.group(2) if (m := _DENSENET_OLD_KEY.match(k)) else k): v
                           for k, v in sd.items()}, getattr(sd, "_metadata", None))


def _timm_filter(spec: BackboneSpec, model: nn.Module):
    """timm's ``checkpoint_filter_fn`` of the model's module (remaps original checkpoints), or None."""
    import importlib

    import timm

    module = importlib.import_module(timm.models.model_entrypoint(spec.constructor).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    return None if fn is None else (lambda sd: fn(sd, model))


def _pretrained(spec: BackboneSpec, tag: str) -> tuple[nn.Module, str, str]:
    """Model of ``spec`` with pretrained ``tag`` loaded safely; also the file and its SHA-256."""
    if spec.source == "offline":  # packaged files: full SHA-256 checked and read with weights_only=True there
        from adspine.backbones.offline import OFFLINE_MODELS, build_offline, offline_weights_path

        model = build_offline(spec.constructor)
        return model, str(offline_weights_path(spec.constructor)), OFFLINE_MODELS[spec.constructor].sha256
    loc = weights_location(spec, tag)
    if not loc.cached:
        preflight(spec, f"imagenet:{tag}")  # offline: one line naming the missing file
        path = download(loc)
    else:
        path = loc.path
    kw = _constructor_kwargs(spec, None)
    convert = None
    aux_dropped = spec.source == "torchvision" and kw.get("aux_logits") is False
    if aux_dropped:  # the files hold the auxiliary heads: build as torchvision does for weights, then drop them
        kw.update(aux_logits=True, init_weights=False)
    if spec.source == "torchvision" and spec.constructor.startswith("densenet"):
        convert = _rename_densenet
    model = _architecture(spec, kw)
    if spec.source == "timm":
        convert = _timm_filter(spec, model)
    digest = load_state_file(model, path, spec.name, convert=convert, cached=True)
    if aux_dropped:  # as torchvision does for googlenet / inception_v3: same modules as the random build
        model.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    return model, str(path), digest


# ------------------------------------------------------------------------------------------------ file loading


def _unwrap(obj: object, origin: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InitError(f"{origin}: not a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        meta = getattr(obj, "_metadata", None)
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
        if meta is not None:
            obj = _with_metadata(obj, {k.removeprefix("module").removeprefix("."): v for k, v in meta.items()})
    return obj


def _with_metadata(sd: dict[str, torch.Tensor], metadata: dict | None) -> dict[str, torch.Tensor]:
    """``sd`` carrying a state dict's ``_metadata`` (per-module versions that e.g. MNASNet's loader reads)."""
    if metadata is None:
        return sd
    out = OrderedDict(sd)
    out._metadata = metadata
    return out


def _load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], origin: str, name: str) -> None:
    """Strict load with a one-line report of missing / unexpected / mis-shaped keys.

    BatchNorm's ``num_batches_tracked`` (absent from files saved before it existed; unused in eval) is the only key
    that may be missing: the model's own value is kept, as torch does for such files.
    """
    own = model.state_dict()
    sd = _with_metadata({**{k: v for k, v in own.items() if k.endswith(".num_batches_tracked") and k not in sd}, **sd},
                        getattr(sd, "_metadata", None))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise InitError(f"{origin}: state dict keys do not match {name}: {len(missing)} missing "
                        f"(e.g. {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected "
                        f"(e.g. {', '.join(unexpected[:3]) or '-'})")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise InitError(f"{origin}: tensor {k!r} has shape {tuple(sd[k].shape)}, {name} needs {tuple(v.shape)}")
    try:
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError) as e:  # a model's own loader objecting (e.g. an unknown format version)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InitError(f"{origin}: cannot load into {name} ({first})") from None


def read_state_file(path: Path, cached: bool = False, read: Path | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file (safetensors) or ``.pth/.pt/.bin`` file (``torch.load(weights_only=True)``:
    never unpickles anything but tensors); any failure is one line naming the file. ``read``: the file to read instead
    of ``path`` (a cache link's checked target; ``path`` names the format and the file in messages)."""
    again = "; delete it and download it again" if cached else ""
    suffix = path.suffix.lower()
    read = path if read is None else read
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(read))
        elif suffix in (".pth", ".pt", ".bin") or cached:
            obj = torch.load(read, map_location="cpu", weights_only=True)
        else:
            raise InitError(f"{path}: unsupported weights file type {suffix!r}; use .safetensors or .pth")
    except InitError:
        raise
    except pickle.UnpicklingError:
        raise InitError(f"{path}: cannot read weights: the file holds pickled objects other than tensors, which are "
                        f"never unpickled (weights_only=True){again}") from None
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InitError(f"{path}: cannot read weights ({first}){again}") from None
    return _unwrap(obj, str(path))


def load_state_file(model: nn.Module, path: str | Path, name: str = "the model", convert=None,
                    cached: bool = False) -> str:
    """Load a weights file into ``model`` strictly (see ``read_state_file``); returns the file's SHA-256.

    ``convert`` (optional) renames a state dict in another layout (e.g. the original EfficientNet-Lite files) onto
    the model's keys; it is applied only when the file's keys do not already match. ``cached``: a pretrained file
    from a library cache, first checked against the hash its name states (``weights.verify_cached``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InitError(f"{path}: weights file not found")
    if cached:  # read the file that was checked (a link's target), not the link again; the format is the link's
        digest, real = verify_cached(path), path.resolve(strict=True)
        sd = read_state_file(path, cached, read=real)
    else:
        digest = sha256_file(path)
        sd = read_state_file(path, cached)
    if convert is not None and set(sd) != set(model.state_dict()):
        try:
            sd = convert(sd)
        except Exception:  # noqa: BLE001 - not that layout either: the strict check below reports the mismatch
            pass
    _load_state_dict(model, sd, str(path), name)
    return digest


# --------------------------------------------------------------------------------------------- random schemes

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def apply_scheme(model: nn.Module, scheme: str, seed: int) -> nn.Module:
    """Re-initialise conv and linear weights with ``scheme`` from a generator seeded with ``seed``.

    kaiming_normal: He normal, fan-out, ReLU gain (torchvision's ResNet choice); xavier_uniform: gain 1; orthogonal:
    gain 1 on the flattened (out, in * k * k) weight. Conv/linear biases 0; affine norms weight 1, bias 0; any other
    parameter (e.g. ConvNeXt layer scale) keeps the framework default.
    """
    if scheme not in RANDOM_SCHEMES:
        raise InitError(f"unknown random scheme {scheme!r}; valid: {', '.join(RANDOM_SCHEMES)}")
    gen = torch.Generator().manual_seed(int(seed))
    fill = {
        "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=gen),
        "xavier_uniform": lambda w: nn.init.xavier_uniform_(w, generator=gen),
        "orthogonal": lambda w: nn.init.orthogonal_(w, generator=gen),
    }[scheme]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                fill(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, _NORMS):
                if getattr(m, "weight", None) is not None:
                    m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
    return model


# ------------------------------------------------------------------------------------------------- entry point


def build_model(spec: BackboneSpec, init: str = "imagenet", *, init_seed: int = 0,
                zero_init_last: bool = False) -> tuple[nn.Module, InitRecord]:
    """The full model of ``spec`` on the CPU, initialised as ``init`` asks, and the record of that choice.

    ``init_seed`` seeds ``random`` (global RNG forked for the construction) and the named schemes;
    ``zero_init_last`` (``random`` only) zero-initialises the last norm of every residual block where the model has
    that option (torchvision ``zero_init_residual``, timm ``zero_init_last``; timm's default True is overridden).
    """
    kind, arg, _ = preflight(spec, init, zero_init_last)
    if kind == "imagenet":
        tag = arg or spec.default_tag
        with torch.random.fork_rng(devices=[]):
            model, path, digest = _pretrained(spec, tag)
        record = InitRecord(init, weights_tag=tag, imagenet_top1=weight_tags(spec).get(tag), weights_file=path,
                            weights_sha256=digest)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(init_seed))
            model = construct(spec, zero_init_last=zero_init_last if spec.zero_init_kw else None)
        record = InitRecord(init, init_seed=int(init_seed),
                            zero_init_last=bool(zero_init_last) if kind == "random" and spec.zero_init_kw else None)
        if kind in RANDOM_SCHEMES:
            apply_scheme(model, kind, init_seed)
        elif kind == "file":
            record.init_seed = None
            record.weights_file = str(Path(arg).expanduser().resolve())
            convert = None
            if spec.source == "offline":
                from adspine.backbones.offline import convert_state_dict

                convert = lambda sd: convert_state_dict(spec.constructor, sd)  # noqa: E731
            record.weights_sha256 = load_state_file(model, arg, spec.name, convert=convert)
    return model.eval(), record
