"""The fitted model's size, estimated before fitting from the layer records, the settings and the image count.

Dominant float32 tensors only: PaDiM keeps a mean and a d x d whitening factor per position of the first layer's
grid; PatchCore a memory bank of ``coreset_ratio`` of the patches (first used layer's grid) x ``target_dim``; SPADE the
whole gallery (every training image's patches of every layer) plus the pooled vectors. CFLOW: not estimated (None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adspine.features import LayerInfo

LIMIT_BYTES = 500 * 2**20  # above this, ``fit`` / ``export`` warn and say what to change
FLOAT32 = 4
ADVICE = {
    "padim": "a smaller d (--set d=100), coarser layers (--layers with deeper modules, fewer positions) or a smaller "
             "--size; or PatchCore, whose bank grows with the images instead",
    "patchcore": "a smaller coreset_ratio (--set coreset_ratio=0.01) or target_dim, coarser layers or a smaller --size",
    "spade": "fewer training images, coarser layers or a smaller --size; or PatchCore (a subsampled memory bank)",
}


def model_bytes(method: str, settings: dict[str, Any], layers: Sequence[LayerInfo], n_fit: int) -> int | None:
    """Estimated bytes of the fitted method's tensors (None where not estimated)."""
    channels = sum(r.channels for r in layers)
    if method == "padim":
        d = settings.get("d")
        d = channels if d is None else min(int(d), channels)
        h, w = layers[0].grid
        return h * w * (d * d + d) * FLOAT32
    if method == "patchcore":
        from adspine.methods.patchcore import resolve_layers

        first = layers[resolve_layers(settings.get("layers", (1, 2)), len(layers))[0]]
        patches = n_fit * first.grid[0] * first.grid[1]
        rows = min(patches, max(1, int(patches * float(settings.get("coreset_ratio", 0.1)))))
        return rows * int(settings.get("target_dim", 1024)) * FLOAT32
    if method == "spade":
        gallery = sum(r.channels * r.grid[0] * r.grid[1] for r in layers)
        return (n_fit * (gallery + layers[-1].channels) + channels) * FLOAT32
    return None


def describe(method: str, size: int | None, limit: int | None = None) -> tuple[str, str | None]:
    """(``estimated model size ...`` line, warning line or None when within ``limit`` (default ``LIMIT_BYTES``))."""
    limit = LIMIT_BYTES if limit is None else limit
    if size is None:
        return f"model size of {method}: not estimated", None
    line = f"estimated model size {size / 2**20:.1f} MB ({method})"
    if size <= limit:
        return line, None
    return line, (f"the {method} model will take about {size / 2**20:.0f} MB (above {limit / 2**20:.0f} MB); "
                  f"to shrink it: {ADVICE.get(method, 'coarser layers or a smaller --size')}")


def export_bytes(detector) -> int:
    """Approximate bytes of an exported graph: the truncated backbone's and the fitted method's tensors."""
    tensors = [*detector.backbone_state().values(), *detector.method.state_tensors().values()]
    return sum(t.numel() * t.element_size() for t in tensors)
