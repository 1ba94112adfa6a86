"""SPADE (Cohen & Hoshen 2020): K nearest training images, then patch-level nearest neighbours among their patches.

- Image score: mean Euclidean distance to the K nearest training images in the space of globally average-pooled
  features of the deepest given layer (faiss ``IndexFlatL2``).
- Pixel map: for each given layer, the gallery is every patch embedding of those K training images at that layer;
  each test patch scores its distance to the nearest gallery patch (kappa = 1). The per-layer maps are upsampled
  bilinearly (align_corners=False) to the input size and averaged, then blurred (Gaussian, sigma 4).
- The method needs every training feature: fit keeps all per-layer patch features (float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adspine.methods import knn
from adspine.methods.base import AnomalyMethod, Prediction
from adspine.methods.postprocess import DEFAULT_SIGMA, gaussian_blur


class SPADE(AnomalyMethod):
    """Semantic pyramid anomaly detection with K nearest training images (K clipped to the training-set size)."""

    name = "spade"

    def __init__(self, k: int = 50, sigma: float = DEFAULT_SIGMA) -> None:
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"SPADE: k must be >= 1, got {k}")
        self.k, self.sigma = int(k), float(sigma)
        self.train: list[torch.Tensor] = []  # per layer (N, h_i * w_i, C_i) float32
        self.grids: list[tuple[int, int]] = []
        self.pooled: torch.Tensor | None = None  # (N, C_last) float32
        self.notes: list[str] = []
        self._index = None

    @property
    def n_train(self) -> int:
        return 0 if self.pooled is None else int(self.pooled.shape[0])

    @property
    def k_effective(self) -> int:
        return min(self.k, self.n_train)

    def fit(self, batches: Iterable[Sequence[torch.Tensor]]) -> "SPADE":
        per_layer: list[list[torch.Tensor]] | None = None
        pooled: list[torch.Tensor] = []
        with torch.no_grad():
            for batch in batches:
                maps = [m.detach().cpu().float() for m in batch]
                if per_layer is None:
                    per_layer = [[] for _ in maps]
                    self.grids = [tuple(int(s) for s in m.shape[-2:]) for m in maps]
                self._check(maps, [c[0].shape[-1] for c in per_layer] if per_layer[0] else None)
                for store, m in zip(per_layer, maps):
                    store.append(m.flatten(2).transpose(1, 2).contiguous())  # (B, hw, C)
                pooled.append(maps[-1].mean(dim=(2, 3)))
        if per_layer is None:
            raise ValueError("SPADE: fit needs at least 1 training image")
        self.train = []
        for store in per_layer:
            self.train.append(torch.cat(store))
            store.clear()
        self.pooled = torch.cat(pooled)
        self.notes = []
        if self.k > self.n_train:
            self.notes.append(f"k={self.k} clipped to the {self.n_train} training images")
        self._index = None
        return self

    def _check(self, maps: Sequence[torch.Tensor], channels: list[int] | None) -> None:
        grids = [tuple(int(s) for s in m.shape[-2:]) for m in maps]
        chans = [int(m.shape[1]) for m in maps]
        if grids != self.grids or (channels is not None and chans != channels):
            raise ValueError(
                f"SPADE: features have channels {chans} on grids {grids}, expected channels {channels} "
                f"on grids {self.grids}"
            )

    def nearest_images(self, pooled: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Distances (B, K) and indices (B, K) of the K nearest training images to pooled test features (B, C)."""
        if self._index is None:
            self._index = knn.flat_l2_index(self.pooled)
        return knn.search(self._index, pooled, self.k_effective)

    def predict(self, features: Sequence[torch.Tensor], image_size: tuple[int, int]) -> Prediction:
        if self.pooled is None:
            raise RuntimeError("SPADE: predict() called before fit() or load()")
        with torch.no_grad():
            maps = [m.detach().cpu().float() for m in features]
            self._check(maps, [int(t.shape[-1]) for t in self.train])
            dist, nn_idx = self.nearest_images(maps[-1].mean(dim=(2, 3)))
            scores = dist.astype(np.float64).mean(axis=1)
            b = maps[0].shape[0]
            acc = torch.zeros(b, *image_size, dtype=torch.float32)
            for layer, (m, train, (h, w)) in enumerate(zip(maps, self.train, self.grids)):
                layer_scores = torch.empty(b, h, w, dtype=torch.float32)
                queries = m.flatten(2).transpose(1, 2)  # (B, hw, C)
                for i in range(b):
                    gallery = train[torch.from_numpy(nn_idx[i])].reshape(-1, train.shape[-1])
                    d, _ = knn.knn(gallery, queries[i], 1)
                    layer_scores[i] = torch.from_numpy(d[:, 0]).reshape(h, w)
                acc += F.interpolate(
                    layer_scores.unsqueeze(1), size=tuple(image_size), mode="bilinear", align_corners=False
                ).squeeze(1)
            out = gaussian_blur(acc / len(maps), self.sigma)
        return Prediction(maps=out.numpy().astype(np.float32), scores=scores)

    # -- persistence -----------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "sigma": self.sigma}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.pooled is None:
            raise RuntimeError("SPADE: nothing to save before fit()")
        out = {f"train.{i}": t for i, t in enumerate(self.train)}
        out["pooled"] = self.pooled
        out["grids"] = torch.tensor(self.grids, dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        n_layers = sum(1 for k in tensors if k.startswith("train."))
        self.train = [tensors[f"train.{i}"].float() for i in range(n_layers)]
        self.pooled = tensors["pooled"].float()
        self.grids = [tuple(int(s) for s in g) for g in tensors["grids"]]
        self._index = None

    def extra_state(self) -> dict[str, Any]:
        return {"n_train": self.n_train, "k_effective": self.k_effective, "notes": list(self.notes)}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.notes = list(extra.get("notes", []))
