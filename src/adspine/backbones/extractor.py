"""Feature extraction over any registry entry: layer presets, measured strides, a network truncated after its last
needed module.

Shapes and strides are measured by a forward pass of a weight-free copy on the ``meta`` device (no compute), so
``thesis``/``stride`` presets and explicit module names are checked without running the real network. The real
network is cut with torch.fx (``create_feature_extractor``): modules after the last requested output are not part
of the graph and never run.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adspine.backbones.init import InitError, build_model, construct
from adspine.backbones.precision import DEFAULT_PRECISION, TORCH_PRECISIONS, PrecisionError, check_precision
from adspine.backbones.registry import BackboneSpec, get_spec
from adspine.backbones.weights import preflight
from adspine.features import DEFAULT_RD_SEED, LayerInfo, fuse, rd_indices

PRESETS = ("thesis", "stride")
STRIDE_TARGETS = (4, 8, 16)
PROBE_SIZE = 224


class LayerError(ValueError):
    """A bad layer request; the message is one line naming the offending value."""


@dataclass(frozen=True)
class ModuleOutput:
    """A module's output as measured by a meta forward: shape, stride, call count and completion order."""

    name: str
    shape: tuple[int, ...] | None
    calls: int
    order: int
    input_size: int

    @property
    def is_map(self) -> bool:
        return self.shape is not None and len(self.shape) == 4

    @property
    def stride(self) -> int | None:
        """Input size over output size rounded to a power of two (AlexNet's 55 px at 224 -> 4)."""
        if not self.is_map:
            return None
        return 2 ** round(math.log2(self.input_size / self.shape[-1]))

    @property
    def parent(self) -> str:
        return self.name.rpartition(".")[0]


def trace_outputs(model: nn.Module, size: int = PROBE_SIZE) -> dict[str, ModuleOutput]:
    """Output shape of every module that runs in ``model``'s forward on a (1, 3, size, size) meta input."""
    records: dict[str, ModuleOutput] = {}
    counter = itertools.count()

    def hook(name: str):
        def fn(_mod, _inp, out):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            calls = records[name].calls + 1 if name in records else 1
            records[name] = ModuleOutput(name, shape, calls, next(counter), size)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return records


@contextlib.contextmanager
def _parameters_on_meta():
    """Move every parameter and buffer to ``meta`` as it is registered (for constructors that compute with tensors,
    e.g. torchvision's RegNet, and so fail under ``torch.device("meta")``)."""
    reg_p, reg_b = nn.Module.register_parameter, nn.Module.register_buffer

    def param(self, name, p):
        reg_p(self, name, None if p is None else nn.Parameter(p.to("meta"), requires_grad=p.requires_grad))

    def buffer(self, name, t, persistent=True):
        reg_b(self, name, None if t is None else t.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = param, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = reg_p, reg_b


def meta_model(spec: BackboneSpec) -> nn.Module:
    """A weight-free build of ``spec`` (framework architecture, parameters on the meta device)."""
    zero = False if spec.zero_init_kw else None
    try:
        with torch.device("meta"):
            return construct(spec, zero_init_last=zero)
    except NotImplementedError:  # data-dependent construction ("Cannot copy out of meta tensor")
        with _parameters_on_meta():
            return construct(spec, zero_init_last=zero)


def probe(spec: BackboneSpec | str, size: int = PROBE_SIZE) -> dict[str, ModuleOutput]:
    """``trace_outputs`` of a weight-free (meta) build of ``spec``: shapes without weights or compute."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise LayerError(f"input size {size!r} is not usable; give an integer of at least 32")
    return trace_outputs(meta_model(spec), size)


def stage_candidates(spec: BackboneSpec, outputs: dict[str, ModuleOutput]) -> list[ModuleOutput]:
    """Maps output by direct children of the row's stage containers, in execution order."""
    return sorted((o for o in outputs.values() if o.parent in spec.stage_parents and o.name not in spec.stage_parents
                   and o.is_map and o.calls == 1), key=lambda o: o.order)


def stride_layers(spec: BackboneSpec, outputs: dict[str, ModuleOutput]) -> list[str]:
    """The last stage candidate at each measured stride 4, 8 and 16."""
    cands = stage_candidates(spec, outputs)
    names = []
    for s in STRIDE_TARGETS:
        at = [c.name for c in cands if c.stride == s]
        if not at:
            seen = sorted({c.stride for c in cands})
            raise LayerError(f"{spec.name} has no stage output at stride {s}; measured strides: {seen}")
        names.append(at[-1])
    return names


def resolve_layers(spec: BackboneSpec, layers: str | Sequence[str], outputs: dict[str, ModuleOutput]) -> list[str]:
    """Module names for ``layers`` (``thesis``, ``stride``, or module names, comma-separated or a list), shallow to
    deep by execution order. Unknown, repeated, non-map and multiply-run modules are errors."""
    if isinstance(layers, str) and layers in PRESETS:
        names = list(spec.thesis) if layers == "thesis" else stride_layers(spec, outputs)
    else:
        names = [n.strip() for n in layers.split(",")] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise LayerError(f"layers must be 'thesis', 'stride' or module names, got {layers!r}")
    if len(set(names)) != len(names):
        raise LayerError(f"layers repeat a module: {names}")
    for n in names:
        out = outputs.get(n)
        if out is None or not out.is_map:
            valid = [c.name for c in stage_candidates(spec, outputs)]
            others = [o.name for o in sorted(outputs.values(), key=lambda o: o.order)
                      if o.is_map and o.calls == 1 and o.name not in valid]
            raise LayerError(f"unknown or non-map module {n!r} for {spec.name}; valid: {', '.join(valid)} "
                             f"(or one of {len(others)} submodules, e.g. {', '.join(others[:2])})")
        if out.calls != 1:
            raise LayerError(f"module {n!r} of {spec.name} runs {out.calls} times per forward; pick one that runs once")
    return sorted(names, key=lambda n: outputs[n].order)


class TruncatedNet(nn.Module):
    """An fx GraphModule cut after the last needed node; ``forward`` returns ``{module name: output}``."""

    def __init__(self, graph_module: nn.Module, nodes: dict[str, str]) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.nodes = dict(nodes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.graph_module(x)
        return {name: out[node] for name, node in self.nodes.items()}


def truncate(model: nn.Module, names: Sequence[str]) -> TruncatedNet:
    """``model`` cut after the last of modules ``names`` (torch.fx: later modules are not in the graph).

    Each module's output is its last graph node, so a module and its last child (``features`` and ``features.12``)
    share one node instead of one of them silently getting an earlier node.
    """
    from timm.models import create_feature_extractor, get_graph_node_names

    _, graph_nodes = get_graph_node_names(model.eval())
    last: dict[str, str] = {}
    for node in graph_nodes:
        for n in names:
            if node == n or node.startswith(n + "."):
                last[n] = node
    missing = [n for n in names if n not in last]
    if missing:
        raise LayerError(f"modules {missing} are not traceable graph nodes of this model")
    unique = list(dict.fromkeys(last[n] for n in names))
    graph_module = create_feature_extractor(model, return_nodes={u: u for u in unique})
    return TruncatedNet(graph_module, {n: last[n] for n in names}).eval()


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``image_size`` (an int or (H, W)) as (H, W) of positive ints; anything else is a one-line ``LayerError``."""
    pair = tuple(image_size) if isinstance(image_size, Sequence) and not isinstance(image_size, str) else \
        (image_size, image_size)
    try:
        hw = tuple(operator.index(v) for v in pair if not isinstance(v, bool))
    except TypeError:
        hw = ()
    if len(hw) != 2 or len(pair) != 2 or min(hw) <= 0:
        raise LayerError(f"image size must be a positive int or (H, W), got {image_size!r}")
    return hw


class FeatureExtractor(nn.Module):
    """Per-layer maps of a truncated backbone from images in [0, 1] (normalisation inside, inference mode, eval).

    ``layers``: one ``LayerInfo`` per output (name, channels, measured stride, grid at the probe size), shallow to
    deep; ``layer_names``, ``channels`` and ``strides`` are read from them, ``layer_info(size)`` gives the grids for
    any input size.

    ``precision`` (``fp32`` or ``bf16``; ``set_precision`` changes it): bf16 runs the network under
    ``torch.autocast(bfloat16)`` with weights and input in channels_last; every returned map is float32 in the
    default contiguous layout either way (one conversion at the boundary).
    """

    def __init__(self, body: TruncatedNet, layers: Sequence[LayerInfo], mean: Sequence[float], std: Sequence[float],
                 default_d: int | None, info: dict) -> None:
        super().__init__()
        self.body = body.eval()
        if [rec.name for rec in layers] != list(body.nodes):
            raise LayerError(f"layer records {[rec.name for rec in layers]} do not match the network's outputs "
                             f"{list(body.nodes)}")
        self.layers = tuple(layers)
        self._grids: dict[tuple[int, int], tuple[LayerInfo, ...]] = {}
        self.register_buffer("_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.default_d = default_d
        self.info = info
        self.precision = DEFAULT_PRECISION

    @property
    def layer_names(self) -> list[str]:
        return [rec.name for rec in self.layers]

    @property
    def channels(self) -> list[int]:
        return [rec.channels for rec in self.layers]

    @property
    def strides(self) -> list[int | None]:
        return [rec.stride for rec in self.layers]

    def layer_info(self, image_size: int | Sequence[int]) -> tuple[LayerInfo, ...]:
        """Layer records for (B, 3, H, W) inputs of ``image_size`` (int or (H, W)): the grids are the output shapes
        of the truncated network on a meta tensor of that size (the network's own rounding), cached per size."""
        hw = image_hw(image_size)
        if hw not in self._grids:
            try:
                out = self._meta_forward(torch.zeros(1, 3, *hw, device="meta"))
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                name = self.info.get("backbone", "the backbone")
                raise LayerError(f"input size {hw[0]} x {hw[1]} does not fit {name} ({first})") from None
            self._grids[hw] = tuple(LayerInfo(rec.name, rec.channels, rec.stride,
                                              (int(out[rec.name].shape[-2]), int(out[rec.name].shape[-1])))
                                    for rec in self.layers)
        return self._grids[hw]

    def _meta_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The truncated network on meta tensors (shapes only, no compute, weights untouched)."""
        state = {k: v.to("meta") for k, v in itertools.chain(self.body.named_parameters(), self.body.named_buffers())}
        with torch.no_grad():
            return torch.func.functional_call(self.body, state, (x,))

    def set_precision(self, precision: str) -> FeatureExtractor:
        """Run the network in ``precision`` (``fp32`` or ``bf16``) from now on; recorded in ``info``."""
        if check_precision(precision) not in TORCH_PRECISIONS:
            raise PrecisionError(f"precision {precision!r} is not run by torch here; use "
                                 f"adspine.backbones.openvino_backend for it")
        self.body.to(memory_format=torch.channels_last if precision == "bf16" else torch.contiguous_format)
        self.precision = self.info["precision"] = precision
        return self

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always stays in eval mode (frozen BatchNorm statistics)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) images in [0, 1] -> per-layer maps (B, C_i, h_i, w_i), shallow to deep."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
        if any(m.training for m in self.body.modules()):  # after copy.deepcopy: torch.fx rebuilds its modules
            self.eval()  # in training mode, where BatchNorm would use the batch's statistics
        with torch.inference_mode():
            x = (images.to(self._mean.device, torch.float32) - self._mean) / self._std
            if self.precision == "fp32":
                out = self.body(x)
                return [out[n] for n in self.layer_names]
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                out = self.body(x.contiguous(memory_format=torch.channels_last))
            return [out[n].to(torch.float32, memory_format=torch.contiguous_format) for n in self.layer_names]

    def embed(self, images: torch.Tensor, d: int | None | str = "default", rd_seed: int = DEFAULT_RD_SEED,
              mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fused embedding (deeper maps upsampled to the first grid) and the Rd channel indices used (or None)."""
        d = self.default_d if d == "default" else d
        emb = fuse(self(images), mode=mode)
        idx = rd_indices(emb.shape[1], d, rd_seed)
        return (emb if idx is None else emb[:, idx.to(emb.device)]), idx

    def truncated_params(self) -> int:
        """Parameters of the truncated network (the modules that run)."""
        return sum(p.numel() for p in self.body.parameters())

    def flops(self, size: int | Sequence[int] = PROBE_SIZE, batch: int = 1) -> int:
        """FLOPs (2 per multiply-add, ``torch.utils.flop_counter``) of the truncated network on (batch, 3, H, W)
        inputs of ``size`` (int or (H, W)), counted on meta tensors (shapes only, no compute)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self._meta_forward(torch.zeros(batch, 3, *image_hw(size), device="meta"))
        return int(counter.get_total_flops())


def build_extractor(name: str, init: str = "imagenet", layers: str | Sequence[str] = "thesis", device: str = "cpu",
                    *, init_seed: int = 0, zero_init_last: bool = False, precision: str = DEFAULT_PRECISION
                    ) -> FeatureExtractor:
    """Build the ``FeatureExtractor`` of registry row ``name`` (see ``init.build_model`` for ``init``) running in
    ``precision`` (``fp32`` or ``bf16``; int8 is ``openvino_backend``'s)."""
    spec = get_spec(name)
    if check_precision(precision) not in TORCH_PRECISIONS:
        raise PrecisionError(f"precision {precision!r} is not run by torch; build an fp32 extractor and convert it "
                             f"with adspine.backbones.openvino_backend")
    if torch.device(device).type == "meta":
        raise InitError("device 'meta' holds no weights; use backbones.probe() for shapes")
    preflight(spec, init, zero_init_last)  # a missing weights file fails here, before any build
    outputs = probe(spec)
    names = resolve_layers(spec, layers, outputs)
    model, record = build_model(spec, init, init_seed=init_seed, zero_init_last=zero_init_last)
    return from_model(spec, model, names, outputs, record.as_dict(), device).set_precision(precision)


def from_model(spec: BackboneSpec, model: nn.Module, names: Sequence[str], outputs: dict[str, ModuleOutput],
               record: dict, device: str | torch.device = "cpu") -> FeatureExtractor:
    """Wrap an initialised full ``model`` of ``spec``: truncate after ``names`` and attach provenance."""
    body = truncate(model, names)
    info = {"backbone": spec.name, "family": spec.family, "source": spec.source, "constructor": spec.constructor,
            **record, "layers": list(names), "probe_size": PROBE_SIZE, "precision": DEFAULT_PRECISION}
    layers = [LayerInfo(n, outputs[n].shape[1], outputs[n].stride, (outputs[n].shape[2], outputs[n].shape[3]))
              for n in names]
    return FeatureExtractor(body, layers, spec.mean, spec.std, spec.d, info).to(device)
