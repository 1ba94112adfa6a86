"""ONNX export of a fitted detector: backbone + method + upsampling in one graph, ``image`` in, ``score`` and
``map`` out, checked against the torch path with onnxruntime; ``OnnxDetector`` runs an exported file.

The graph takes the preprocessed image (B, 3, H, W) in [0, 1] (preprocessing stays in Python, as for the torch
path); the preprocessing protocol, size and thresholds travel in the file's metadata. PaDiM: Mahalanobis distance by
batched matmul with the stored whitening factors. PatchCore: adaptive channel pooling as a fixed matrix, nearest
neighbour as the argmin of ``|b|^2 - 2 q.b``
against the centred memory bank (a brute-force matrix product; the torch path prunes the same exact search with a
PCA lower bound), the winner's distance then recomputed from the difference. Exported with torch's TorchScript-based
exporter
(``dynamo=False``: no onnxscript needed), opset 17.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adspine.detector import threshold as th
from adspine.detector.detector import Detector, DetectorError, as_size, load_image
from adspine.methods.postprocess import gaussian_blur

OPSET = 17
TOLERANCE = 1e-4  # max |onnx - torch| over the torch map's max absolute value
METADATA_KEY = "adspine"


def pooling_matrix(n: int, target: int) -> torch.Tensor:
    """(n, target) matrix M with ``x @ M == adaptive_avg_pool1d(x, target)`` for vectors of length n."""
    return F.adaptive_avg_pool1d(torch.eye(n).unsqueeze(1), target).squeeze(1)


def _upsample(patch: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    up = F.interpolate(patch.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return gaussian_blur(up, sigma)


class PaDiMHead(nn.Module):
    def __init__(self, method) -> None:
        super().__init__()
        # per layer, the drawn channels of that layer in drawn order, layers concatenated (PaDiM's select_and_fuse)
        channels = [r.channels for r in method.feature_layers_]
        idx = method.rd_idx_.long()
        offsets = np.cumsum([0] + channels).tolist()
        self.local = [idx[(idx >= a) & (idx < b)] - a for a, b in zip(offsets[:-1], offsets[1:])]
        self.register_buffer("mean", method.mean_.float())  # (P, d)
        self.register_buffer("whiten_t", method.whiten_.float().transpose(1, 2).contiguous())  # (P, d, d)
        self.sigma = float(method.sigma)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        grid = maps[0].shape[-2:]
        parts = []
        for m, local in zip(maps, self.local):
            if local.numel() == 0:
                continue
            sel = m.index_select(1, local)
            if sel.shape[-2:] != grid:
                sel = F.interpolate(sel, size=grid, mode="nearest")
            parts.append(sel)
        emb = torch.cat(parts, dim=1)
        b, d, h, w = emb.shape
        x = emb.flatten(2).permute(2, 0, 1) - self.mean.unsqueeze(1)  # (P, B, d)
        dist = torch.linalg.vector_norm(torch.bmm(x, self.whiten_t), dim=-1)  # (P, B)
        amap = _upsample(dist.permute(1, 0).reshape(b, h, w), size, self.sigma)
        return amap.flatten(1).amax(dim=1), amap


class PatchCoreHead(nn.Module):
    def __init__(self, method) -> None:
        super().__init__()
        if method.reweight:
            raise DetectorError("PatchCore with reweight=True cannot be exported (its neighbourhood re-weighting "
                                "is data-dependent); refit with reweight=False")
        self.used = [int(i) for i in method.layers_used_]
        self.target = int(method.target_dim)
        recs = method.feature_layers_
        self.pools = [pooling_matrix(recs[i].channels * 9, self.target) for i in self.used]
        self.final = pooling_matrix(self.target * len(self.used), self.target)
        bank = method.bank_.float()
        centre = bank.mean(dim=0)
        self.register_buffer("bank", bank.contiguous())
        self.register_buffer("centre", centre)
        self.register_buffer("centred_t", (bank - centre).t().contiguous())
        self.register_buffer("centred_sq", (bank - centre).square().sum(1))
        self.squared = method.distance == "squared"
        self.sigma = float(method.sigma)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        ref = maps[self.used[0]].shape[-2:]
        per_layer = []
        for i, pool in zip(self.used, self.pools):
            m = maps[i]
            b, c, h, w = m.shape
            u = F.unfold(m, kernel_size=3, stride=1, padding=1).transpose(1, 2) @ pool  # (B, h*w, T)
            p = u.transpose(1, 2).reshape(b, self.target, h, w)
            if (h, w) != tuple(ref):
                p = F.interpolate(p, size=ref, mode="bilinear", align_corners=False)
            per_layer.append(p.flatten(2).transpose(1, 2))  # (B, P, T)
        x = torch.cat(per_layer, dim=2) @ self.final  # layer-major concatenation, pooled again: (B, P, T)
        b = x.shape[0]
        # brute-force exact search (same nearest row as knn.NearestBank): argmin against the centred bank, then the
        # winner's distance from the difference
        nearest = (self.centred_sq - 2 * ((x - self.centre) @ self.centred_t)).argmin(dim=-1)  # (B, P)
        winner = self.bank.index_select(0, nearest.flatten()).reshape(x.shape)
        patch = (x - winner).square().sum(-1).reshape(b, ref[0], ref[1])
        patch = patch if self.squared else patch.sqrt()
        return patch.flatten(1).amax(dim=1), _upsample(patch, size, self.sigma)


HEADS = {"padim": PaDiMHead, "patchcore": PatchCoreHead}


class DetectorGraph(nn.Module):
    """image (B, 3, H, W) in [0, 1] -> (score (B,), map (B, H, W)): normalisation, truncated backbone, method head."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        name = detector.method.name
        if name not in HEADS:
            raise DetectorError(f"ONNX export supports {', '.join(sorted(HEADS))}; {name} cannot be exported "
                                f"(use the saved detector folder with adspine predict)")
        ex = detector.extractor
        self.body, self.names = ex.body, list(ex.layer_names)
        self.register_buffer("mean", torch.tensor(ex.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(ex.std).view(1, 3, 1, 1))
        self.head = HEADS[name](detector.method)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.body((image - self.mean) / self.std)
        return self.head([out[n] for n in self.names], tuple(image.shape[-2:]))


def metadata(detector: Detector) -> dict:
    return {"backbone": detector.backbone, "init": detector.init, "method": detector.method.name,
            "layers": detector.layers, "protocol": detector.protocol,
            "image_size": detector.config()["image_size"], "threshold": detector.threshold,
            "pixel_threshold": detector.pixel_threshold, "input_sizes": detector.input_sizes}


def export_onnx(detector: Detector, path: str | Path, check: bool = True, seed: int = 0) -> dict:
    """Write ``path`` (.onnx) and, with ``check``, compare onnxruntime with the torch path on two seeded random
    images; returns ``{"path", "max_abs_diff", "relative_diff", "score_relative_diff"}``. A relative map difference
    above ``TOLERANCE`` is a ``DetectorError``. The graph is fp32 also for a bf16 detector."""
    import onnx

    path = Path(path)
    graph = DetectorGraph(detector).eval()
    h, w = detector._input_size()
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (x[:1],), str(path), dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=["score", "map"],
                          dynamic_axes={"image": {0: "batch"}, "score": {0: "batch"}, "map": {0: "batch"}})
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata(detector))
    onnx.save(model, str(path))
    result = {"path": str(path)}
    if check:
        fitted = detector.precision
        try:  # the graph is fp32 whatever the detector's precision: compare it with the fp32 torch path
            ref_scores, ref_maps = detector.set_precision("fp32").predict(x)
        finally:
            detector.set_precision(fitted)
        scores, maps = OnnxDetector(path).run(x.numpy())
        diff = float(np.abs(maps - ref_maps).max())
        result.update(max_abs_diff=diff, relative_diff=diff / max(float(np.abs(ref_maps).max()), 1e-12),
                      score_relative_diff=float(np.abs(scores - ref_scores).max() / max(np.abs(ref_scores).max(),
                                                                                            1e-12)))
        if result["relative_diff"] > TOLERANCE:
            raise DetectorError(f"{path}: onnxruntime maps differ from torch by {result['relative_diff']:.2e} "
                                f"(relative), above {TOLERANCE:g}")
    return result


class OnnxDetector:
    """An exported detector run with onnxruntime: ``predict(images) -> (scores, maps)`` and ``flag(scores)`` like
    ``Detector``."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            meta = json.loads(self.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
            raise DetectorError(f"{path}: not an adspine ONNX detector ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        self.set_metadata(path, meta)

    def set_metadata(self, path: Path, meta: dict) -> None:
        """The exported file's facts (preprocessing, thresholds, names) as attributes (shared with OpenVINO)."""
        self.path, self.meta = path, meta
        self.protocol, self.image_size = meta["protocol"], as_size(meta["image_size"])
        self.threshold, self.pixel_threshold = meta["threshold"], meta["pixel_threshold"]
        self.input_sizes = meta.get("input_sizes")  # absent in files exported before it was recorded
        self.backbone, self.method_name = meta["backbone"], meta["method"]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, amap = self.session.run(["score", "map"], {"image": np.ascontiguousarray(x, dtype=np.float32)})
        return score.astype(np.float64), amap.astype(np.float32)

    def predict(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Paths / float (H, W, 3) arrays, or a preprocessed (N, 3, H, W) tensor."""
        if isinstance(images, torch.Tensor):
            return self.run(images.numpy())
        scores, maps = [], []
        for item in images:
            s, m = self.run(load_image(item, self.protocol, self.image_size)[None].numpy())
            scores.append(s)
            maps.append(m)
        if not scores:
            raise DetectorError("predict() got no image")
        return np.concatenate(scores), np.concatenate(maps)

    def flag(self, scores: np.ndarray) -> np.ndarray:
        return th.above(scores, self.threshold)

    def flag_pixels(self, maps: np.ndarray) -> np.ndarray:
        return th.above(maps, self.pixel_threshold)
