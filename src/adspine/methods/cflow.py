"""CFLOW-AD (Gudovskiy et al., WACV 2022): one conditional normalizing flow per feature layer.

Each selected layer gets a FrEIA ``SequenceINN`` of ``AllInOneBlock`` coupling blocks (subnet: 2-layer MLP with hidden
width 2 x input, soft-clamped affine coupling ``clamp_alpha``, SOFTPLUS global affine, soft (random rotation)
permutation), conditioned on a 2-D sinusoidal encoding of the patch position. The flows are trained by maximum
likelihood on randomly shuffled fibres (one feature vector at one position of one training image) with Adam and a
fixed number of epochs: no model selection, no early stopping.

Score normalization uses training data only: after training, each layer's per-dimension log-likelihood of every
training fibre is computed once and its maximum ``m_l`` is stored with the model. A test fibre's layer score is
``1 - exp(logp - m_l)`` (``normalization="exp"``, the paper's exp-normalization with a training constant) or
``m_l - logp`` (``"log"``). Layer maps are upsampled bilinearly to the input size, summed, and blurred (sigma 4, as
for the other methods); image score = map maximum. Nothing depends on the evaluation batch. Training progress (epoch,
loss per layer, seconds) goes to the ``adspine.methods.cflow`` logger at INFO. See ``docs/cflow.md``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock

from adspine.methods.base import AnomalyMethod, CostShape, MethodInfo, Prediction
from adspine.methods.postprocess import DEFAULT_SIGMA, gaussian_blur, patch_scores_to_map

log = logging.getLogger(__name__)

NORMALIZATIONS = ("exp", "log")
FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
EVAL_CHUNK = 4096  # fibres per flow call at evaluation; results do not depend on it (no batch statistics)
_LOG_2PI = math.log(2.0 * math.pi)



def positional_encoding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """(dim, H, W) sinusoidal encoding: first half of channels encodes the column (sin/cos interleaved), second half
    the row, frequencies ``10000^(-2k/(dim/2))`` (the layout of the CFLOW-AD code's ``positionalencoding2d``)."""
    if dim <= 0 or dim % 4 != 0:
        raise ValueError(f"pos_dim={dim}: must be a positive multiple of 4")
    half = dim // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(1e4) / half))  # (half/2,)
    ang_x = torch.arange(width, dtype=torch.float64)[:, None] * freq  # (W, half/2)
    ang_y = torch.arange(height, dtype=torch.float64)[:, None] * freq  # (H, half/2)
    pe = torch.zeros(dim, height, width, dtype=torch.float64)
    pe[0:half:2] = torch.sin(ang_x).T[:, None, :]
    pe[1:half:2] = torch.cos(ang_x).T[:, None, :]
    pe[half::2] = torch.sin(ang_y).T[:, :, None]
    pe[half + 1 :: 2] = torch.cos(ang_y).T[:, :, None]
    return pe.float()


def _position_table(dim: int, height: int, width: int) -> torch.Tensor:
    """(H*W, dim) conditions, row-major over positions (matches ``x.permute(0, 2, 3, 1).reshape(-1, C)``)."""
    return positional_encoding_2d(dim, height, width).reshape(dim, height * width).T.contiguous()


def _subnet_fc(dims_in: int, dims_out: int) -> nn.Module:
    """Coupling subnet of the paper's code: Linear(in, 2 in) - ReLU - Linear(2 in, out)."""
    return nn.Sequential(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(), nn.Linear(2 * dims_in, dims_out))


def _random_rotation(n: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-distributed matrix of SO(n) (QR of a Gaussian matrix with the sign fix), drawn from ``gen``."""
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def build_flow(channels: int, pos_dim: int, blocks: int, clamp: float, gen: torch.Generator) -> SequenceINN:
    """Conditional flow of ``blocks`` FrEIA AllInOneBlocks, initialised from ``gen`` only (global RNGs untouched).

    FrEIA draws its soft permutation from numpy's global RNG (scipy ``special_ortho_group``) and the subnets from
    torch's; we build with hard permutations inside a forked torch RNG seeded from ``gen`` and then replace each
    block's permutation by a random rotation from ``gen``, which is what ``permute_soft=True`` samples."""
    init_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            flow = SequenceINN(channels)
            for _ in range(blocks):
                flow.append(
                    AllInOneBlock,
                    cond=0,
                    cond_shape=(pos_dim,),
                    subnet_constructor=_subnet_fc,
                    affine_clamping=clamp,
                    global_affine_type="SOFTPLUS",
                    permute_soft=False,
                )
    finally:
        np.random.set_state(np_state)
    with torch.no_grad():
        for block in flow.module_list:
            w = _random_rotation(channels, gen).float()
            block.w_perm.copy_(w.view_as(block.w_perm))
            block.w_perm_inv.copy_(w.T.contiguous().view_as(block.w_perm_inv))
    return flow


def log_likelihood_per_dim(flow: SequenceINN, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """log p(x | cond) / C with a standard normal base: (-0.5 ||z||^2 - C/2 log 2 pi + log|det J|) / C."""
    c = x.shape[1]
    z, log_jac_det = flow(x, [cond])
    return (-0.5 * (z**2).sum(1) - 0.5 * c * _LOG_2PI + log_jac_det) / c


class CFlowError(ValueError):
    """A CFLOW setting that cannot work (one line naming the value)."""


def flow_flops_per_fibre(channels: int, pos_dim: int, blocks: int) -> float:
    """Forward FLOPs of one fibre through a flow: per block the subnet Linear(in, 2 in) - Linear(2 in, 2 c2) with
    in = c1 + pos_dim (FrEIA splits C into c1 = C - C // 2 and c2 = C // 2) and the C x C rotation."""
    c1, c2 = channels - channels // 2, channels // 2
    width = c1 + pos_dim
    return blocks * (2.0 * width * 2 * width + 2.0 * 2 * width * 2 * c2 + 2.0 * channels * channels)


def cflow_cost(shape: CostShape, settings: dict) -> float:
    """FLOPs of fit + predict: per used layer, ``epochs`` training passes over the N * P_l fibres (forward +
    backward = 3 forwards), one evaluation pass over them (normalization) and one over the T * P_l test fibres."""
    blocks, pos = int(settings.get("coupling_blocks", 8)), int(settings.get("pos_dim", 128))
    epochs = int(settings.get("epochs", 10))
    used = settings.get("layers") or list(range(len(shape.channels)))
    total = 0.0
    for i in used:
        if i < len(shape.channels):
            p, per_fibre = shape.positions[i], flow_flops_per_fibre(shape.channels[i], pos, blocks)
            total += ((3 * epochs + 1) * shape.n_train + shape.n_test) * p * per_fibre
    return total


class CFlow(AnomalyMethod):
    """CFLOW-AD with a fixed training schedule and a training-data-only score normalization.

    Settings: ``layers`` (indices into the given feature list, None = all), ``coupling_blocks`` (8), ``clamp_alpha``
    (1.9), ``pos_dim`` (128), ``fibre_batch`` (N = 256 fibres per step), ``lr`` (2e-4, Adam), ``epochs`` (passes
    over all training fibres), ``normalization`` (``exp`` | ``log``), ``sigma`` (map blur, 4), ``seed`` (flow
    initialisation and fibre shuffling), ``device`` (``cpu`` | ``cuda``...), ``feature_dtype`` (storage of the
    training features between epochs: ``float32`` | ``float16``).
    """

    # efficiency: measured 0.16 / 0.40 of the conv FLOP/s (benchmarks/methods_dense.py --parts calibrate, R18 at
    # 224, 8 images, 1 epoch)
    info = MethodInfo(
        name="cflow", display="CFLOW-AD", seed_setting="seed", trains=True, cost=cflow_cost, efficiency=0.03,
        summary="conditional normalizing flows on patch features",
    )

    def __init__(
        self,
        layers: list[int] | None = None,
        coupling_blocks: int = 8,
        clamp_alpha: float = 1.9,
        pos_dim: int = 128,
        fibre_batch: int = 256,
        lr: float = 2e-4,
        epochs: int = 10,
        normalization: str = "exp",
        sigma: float = DEFAULT_SIGMA,
        seed: int = 0,
        device: str = "cpu",
        feature_dtype: str = "float32",
    ) -> None:
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not layers or any(
                not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers
            ):
                raise CFlowError(f"layers={layers!r}: must be None or a non-empty list of layer indices >= 0")
            if len(set(layers)) != len(layers):
                raise CFlowError(f"layers={layers!r}: repeated index")
        for key, value in (("coupling_blocks", coupling_blocks), ("fibre_batch", fibre_batch), ("epochs", epochs)):
            if not isinstance(value, int) or value < 1:
                raise CFlowError(f"{key}={value!r}: must be an integer >= 1")
        if not lr > 0:
            raise CFlowError(f"lr={lr!r}: must be > 0")
        if not clamp_alpha > 0:
            raise CFlowError(f"clamp_alpha={clamp_alpha!r}: must be > 0")
        if not isinstance(pos_dim, int) or pos_dim <= 0 or pos_dim % 4:
            raise CFlowError(f"pos_dim={pos_dim!r}: must be a positive multiple of 4")
        if normalization not in NORMALIZATIONS:
            raise CFlowError(f"normalization={normalization!r}: valid: {', '.join(NORMALIZATIONS)}")
        if feature_dtype not in FEATURE_DTYPES:
            raise CFlowError(f"feature_dtype={feature_dtype!r}: valid: {', '.join(FEATURE_DTYPES)}")
        if sigma < 0:
            raise CFlowError(f"sigma={sigma!r}: must be >= 0")
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise CFlowError(f"device={device!r}: not a torch device") from None
        self.layers = list(layers) if layers is not None else None
        self.coupling_blocks = coupling_blocks
        self.clamp_alpha = float(clamp_alpha)
        self.pos_dim = pos_dim
        self.fibre_batch = fibre_batch
        self.lr = float(lr)
        self.epochs = epochs
        self.normalization = normalization
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.device = device
        self.feature_dtype = feature_dtype

    # -- helpers -----------------------------------------------------------------------------------------------
    def _torch_device(self) -> torch.device:
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise CFlowError(f"device={self.device!r}: CUDA is not available on this machine")
        return dev

    def _used(self) -> list[int]:
        """Indices of the used layers; one out of range for the fitted layer records is an error."""
        n = len(self.feature_layers_)
        idx = self.layers if self.layers is not None else list(range(n))
        bad = [i for i in idx if i >= n]
        if bad:
            raise CFlowError(f"layers={self.layers}: index {bad[0]} out of range for {n} feature map(s)")
        return idx

    @torch.no_grad()
    def _layer_logp(self, li: int, fibres: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Per-dim log-likelihood of (E, C) image-major fibres; fibre k has the condition ``table[k % (h*w)]``.
        Evaluated in fixed chunks, each fibre on its own (no batch statistics), returned as float64 on the CPU."""
        flow = self.flows_[li].eval()
        dev = self._torch_device()
        table = table.to(dev)
        out = torch.empty(fibres.shape[0], dtype=torch.float64)
        for s in range(0, fibres.shape[0], EVAL_CHUNK):
            x = fibres[s : s + EVAL_CHUNK].to(dev, torch.float32)
            pos = torch.arange(s, s + x.shape[0], device=dev) % table.shape[0]
            out[s : s + x.shape[0]] = log_likelihood_per_dim(flow, x, table[pos]).double().cpu()
        return out

    # -- estimator surface -------------------------------------------------------------------------------------
    def _fit(self, batches: Iterable[Sequence[torch.Tensor]]) -> None:
        """Keep all training fibres (``feature_dtype``, on ``device``: N * sum(C_l h_l w_l) values), train one flow
        per layer for ``epochs`` passes over freshly shuffled fibres (progress logged per epoch), then record the
        training log-likelihood statistics used for normalization."""
        dev = self._torch_device()
        used = self._used()
        store = FEATURE_DTYPES[self.feature_dtype]
        self.channels_ = [self.feature_layers_[i].channels for i in used]
        grids = [self.feature_layers_[i].grid for i in used]
        chunks: list[list[torch.Tensor]] = [[] for _ in used]
        n_images = 0
        for batch in batches:
            for li, i in enumerate(used):
                m = batch[i]
                chunks[li].append(m.detach().permute(0, 2, 3, 1).reshape(-1, m.shape[1]).to(dev, store))
            n_images += batch[0].shape[0]
        feats = [torch.cat(c) for c in chunks]
        del chunks
        conds = [_position_table(self.pos_dim, h, w).to(dev) for h, w in grids]

        gen = torch.Generator().manual_seed(self.seed)
        self.flows_ = [
            build_flow(c, self.pos_dim, self.coupling_blocks, self.clamp_alpha, gen).to(dev) for c in self.channels_
        ]
        optims = [torch.optim.Adam([p for p in f.parameters() if p.requires_grad], lr=self.lr) for f in self.flows_]
        losses: list[float] = []
        layer_losses: list[list[float]] = []
        t0 = time.perf_counter()
        for epoch in range(self.epochs):
            per_layer = []
            for li, (flow, opt, x_all) in enumerate(zip(self.flows_, optims, feats)):
                flow.train()
                hw = grids[li][0] * grids[li][1]
                n = x_all.shape[0]
                perm = torch.randperm(n, generator=gen).to(dev)
                steps = max(1, n // self.fibre_batch)  # drop the last partial batch, as the paper's code does
                total = torch.zeros((), dtype=torch.float64, device=dev)
                count = 0
                for s in range(steps):
                    idx = perm[s * self.fibre_batch : (s + 1) * self.fibre_batch]
                    logp = log_likelihood_per_dim(flow, x_all[idx].float(), conds[li][idx % hw])
                    loss = -logp.mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.detach().double() * idx.numel()
                    count += idx.numel()
                per_layer.append(float(total) / count)
            mean_loss = float(np.mean(per_layer))
            losses.append(mean_loss)
            layer_losses.append(per_layer)
            log.info(
                "cflow epoch %d/%d loss %.4f (layers %s) %.1fs",
                epoch + 1,
                self.epochs,
                mean_loss,
                ", ".join(f"{v:.4f}" for v in per_layer),
                time.perf_counter() - t0,
            )
        train_seconds = time.perf_counter() - t0

        stats = []
        maxima = []
        for li, x_all in enumerate(feats):
            lp = self._layer_logp(li, x_all, conds[li])
            maxima.append(float(lp.max()))
            q = np.quantile(lp.numpy(), [0.01, 0.5, 0.99]).tolist()
            stats.append(
                {"max": float(lp.max()), "mean": float(lp.mean()), "std": float(lp.std()), "q01": q[0],
                 "median": q[1], "q99": q[2]}
            )
        self.norm_logp_max_ = torch.tensor(maxima, dtype=torch.float64)
        self.history_ = {
            "n_train_images": n_images,
            "grids": [list(g) for g in grids],
            "fibres_per_layer": [int(f.shape[0]) for f in feats],
            "steps_per_epoch": [max(1, int(f.shape[0]) // self.fibre_batch) for f in feats],
            "epoch_losses": losses,
            "epoch_layer_losses": layer_losses,
            "train_logp_per_dim": stats,
            "train_seconds": train_seconds,
        }

    def _predict(self, maps: Sequence[torch.Tensor], image_size: tuple[int, int]) -> Prediction:
        total = None
        for li, i in enumerate(self._used()):
            m = maps[i]
            b, c, h, w = m.shape
            fibres = m.detach().permute(0, 2, 3, 1).reshape(-1, c)
            lp = self._layer_logp(li, fibres, _position_table(self.pos_dim, h, w)).view(b, h, w)
            ref = float(self.norm_logp_max_[li])
            score = 1.0 - torch.exp(lp - ref) if self.normalization == "exp" else ref - lp
            up = patch_scores_to_map(score.float(), image_size, sigma=0)  # bilinear, align_corners=False
            total = up if total is None else total + up
        out = gaussian_blur(total, self.sigma)
        arr = out.cpu().numpy().astype(np.float32)
        return Prediction(maps=arr, scores=arr.reshape(arr.shape[0], -1).max(1).astype(np.float64))

    # -- persistence: the flows' parameters as prefixed tensors ------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        self.check_fitted()
        out: dict[str, torch.Tensor] = {"norm_logp_max_": self.norm_logp_max_.double()}
        for li, flow in enumerate(self.flows_):
            for k, v in flow.state_dict().items():
                out[f"flow{li}.{k}"] = v
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.channels_ = [self.feature_layers_[i].channels for i in self._used()]
        self.norm_logp_max_ = tensors["norm_logp_max_"].double().cpu()
        gen = torch.Generator().manual_seed(self.seed)  # weights are overwritten below; the draw only shapes them
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            log.warning("cflow model trained on %r loaded on the CPU (CUDA is not available)", self.device)
            self.device = "cpu"
        dev = self._torch_device()
        self.flows_ = []
        for li, c in enumerate(self.channels_):
            flow = build_flow(c, self.pos_dim, self.coupling_blocks, self.clamp_alpha, gen)
            prefix = f"flow{li}."
            flow.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
            self.flows_.append(flow.to(dev).eval())

    def extra_state(self) -> dict[str, Any]:
        return {"channels_": list(self.channels_), "history_": dict(self.history_)}
