"""CFLOW-AD behind the method interface: learns, is batch-size invariant, deterministic, saves and loads.

Data: ``adspine.data.synth`` category ``wood`` (seed 0, 64 px, 24 train, 8 good + 8 defective test images) read
through ``scan_category`` / ``ImageDataset`` (``resize``); features from a torchvision ResNet-18 with random init
(torch seed 0, zero_init_residual=False), layers 1-3 (64 x 16 x 16, 128 x 8 x 8, 256 x 4 x 4).
"""

from __future__ import annotations

import copy
import json
import logging
import math

import numpy as np
import pytest
import torch
import torchvision
from sklearn.metrics import roc_auc_score
from torchvision.models.feature_extraction import create_feature_extractor

from adspine.data.mvtec import ImageDataset, scan_category
from adspine.data.synth import generate
from adspine.methods import build_method
from adspine.methods.base import AnomalyMethod, ModelFileError, NotFittedError, meta_digest
from adspine.methods.cflow import (CFlow, CFlowError, build_flow, cflow_cost, flow_flops_per_fibre,
                                   log_likelihood_per_dim, positional_encoding_2d)

SIZE = 64
N_TRAIN = 24
N_GOOD = 8
FIT = dict(coupling_blocks=4, epochs=4, seed=0)  # short CPU schedule; defaults otherwise (N=256, lr 2e-4, pos 128)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    root = generate(tmp_path_factory.mktemp("synth") / "ds", seed=0, size=SIZE, n_train=N_TRAIN,
                    n_test_good=N_GOOD, n_per_defect=2, categories=["wood"])
    cat = scan_category(root, "wood")
    train = ImageDataset(cat.train, protocol="resize", size=SIZE)
    test = [ImageDataset(cat.test, protocol="resize", size=SIZE)[i] for i in range(len(cat.test))]
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    ext = create_feature_extractor(net, ["layer1", "layer2", "layer3"])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    @torch.no_grad()
    def feats(x):
        return list(ext((x - mean) / std).values())

    train_x = torch.stack([train[i]["image"] for i in range(len(train))])
    return {
        "train": [feats(train_x[i : i + 8]) for i in range(0, N_TRAIN, 8)],
        "test": feats(torch.stack([d["image"] for d in test])),
        "labels": np.array([d["label"] for d in test]),
        "masks": np.stack([d["mask"].numpy() for d in test]),
    }


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def fitted(data):
    """The fitted model and the progress lines it logged (INFO, logger adspine.methods.cflow)."""
    logger = logging.getLogger("adspine.methods.cflow")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        model = build_method("cflow", **FIT)
        model.fit(iter(data["train"]))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return model, handler.messages


def test_learns_and_separates_good_from_defective(data, fitted):
    model, messages = fitted
    losses = model.history_["epoch_losses"]
    assert len(losses) == FIT["epochs"] and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1  # measured: 1.01 -> 0.60
    assert data["labels"].sum() == 8 and (data["labels"] == 0).sum() == N_GOOD
    pred = model.predict(data["test"], (SIZE, SIZE))
    assert pred.maps.shape == (len(data["labels"]), SIZE, SIZE) and pred.maps.dtype == np.float32
    np.testing.assert_allclose(pred.scores, pred.maps.reshape(len(data["labels"]), -1).max(1), rtol=0, atol=0)
    # measured on this data: image AUROC 1.0, pixel AUROC 0.98 (both normalizations)
    assert roc_auc_score(data["labels"], pred.scores) > 0.8
    assert roc_auc_score(data["masks"].ravel(), pred.maps.ravel()) > 0.9
    # progress: one log line per epoch with the recorded losses
    assert len(messages) == FIT["epochs"]
    for e, (msg, loss, per_layer) in enumerate(zip(messages, losses, model.history_["epoch_layer_losses"])):
        assert msg.startswith(f"cflow epoch {e + 1}/{FIT['epochs']} loss {loss:.4f} (layers {per_layer[0]:.4f}, ")
    assert model.history_["fibres_per_layer"] == [N_TRAIN * 16 * 16, N_TRAIN * 8 * 8, N_TRAIN * 4 * 4]


def test_log_normalization_also_separates(data, fitted):
    model = copy.copy(fitted[0])
    model.normalization = "log"
    pred = model.predict(data["test"], (SIZE, SIZE))
    assert roc_auc_score(data["labels"], pred.scores) > 0.8


def test_training_images_score_nonnegative_with_exp_normalization(data, fitted):
    """The constant is the maximum training log-likelihood, so 1 - exp(logp - max) >= 0 on every training fibre."""
    model, _ = fitted
    pred = model.predict(data["train"][0], (SIZE, SIZE))
    assert pred.maps.min() >= -1e-6
    stats = model.history_["train_logp_per_dim"]
    assert [s["max"] for s in stats] == pytest.approx(model.norm_logp_max_.tolist())


def test_prediction_does_not_depend_on_batch_size(data, fitted):
    model, _ = fitted
    full = model.predict(data["test"], (SIZE, SIZE))
    ones = [model.predict([f[i : i + 1] for f in data["test"]], (SIZE, SIZE)) for i in range(len(data["labels"]))]
    np.testing.assert_allclose(np.concatenate([p.maps for p in ones]), full.maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([p.scores for p in ones]), full.scores, rtol=0, atol=1e-5)


def test_fit_is_deterministic_and_leaves_global_rngs_alone(data, fitted):
    model, _ = fitted
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    again = CFlow(**FIT).fit(data["train"])
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(np_state[1], np.random.get_state()[1])
    assert again.history_["epoch_losses"] == model.history_["epoch_losses"]
    a, b = model.state_tensors(), again.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another seed draws another initialisation and shuffle
    other = CFlow(layers=[2], coupling_blocks=2, epochs=1, seed=1).fit(data["train"])
    same = CFlow(layers=[2], coupling_blocks=2, epochs=1, seed=0).fit(data["train"])
    assert other.history_["epoch_losses"] != same.history_["epoch_losses"]


def test_save_load_round_trip(tmp_path, data, fitted):
    model, _ = fitted
    folder = model.save(tmp_path / "m", provenance={"backbone": "resnet18", "init": "random"})
    meta = json.loads((folder / "model.json").read_text())
    assert meta["method"] == "cflow" and meta["settings"]["coupling_blocks"] == FIT["coupling_blocks"]
    assert meta["extra_state"]["history_"]["epoch_losses"] == model.history_["epoch_losses"]
    assert any(k.startswith("flow2.") for k in meta["tensors"]) and "norm_logp_max_" in meta["tensors"]
    loaded = AnomalyMethod.load(folder)
    assert isinstance(loaded, CFlow) and loaded.provenance["backbone"] == "resnet18"
    p0, p1 = model.predict(data["test"], (SIZE, SIZE)), loaded.predict(data["test"], (SIZE, SIZE))
    assert np.array_equal(p0.maps, p1.maps) and np.array_equal(p0.scores, p1.scores)
    # the rotation (w_perm) of every block is part of the saved state: a missing one is an error
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        header = f.metadata()
    del tensors["flow0.module_list.0.w_perm"]
    save_file(tensors, str(folder / "model.safetensors"), metadata=header)
    with pytest.raises(ModelFileError, match="missing tensor"):
        AnomalyMethod.load(folder)


def test_layer_selection_and_input_errors(data):
    one = CFlow(layers=[1], coupling_blocks=1, epochs=1, pos_dim=16).fit(data["train"])
    assert one.channels_ == [128] and len(one.flows_) == 1
    assert one.predict(data["test"], (SIZE, SIZE)).maps.shape == (len(data["labels"]), SIZE, SIZE)
    with pytest.raises(CFlowError, match="out of range"):
        CFlow(layers=[3], epochs=1).fit(data["train"])
    with pytest.raises(ValueError, match="no training batch"):
        CFlow(epochs=1).fit([])
    with pytest.raises(ValueError, match="feature map"):
        one.predict([data["test"][0], data["test"][0]], (SIZE, SIZE))
    with pytest.raises(NotFittedError, match="not fitted"):
        CFlow().predict(data["test"], (SIZE, SIZE))
    for bad in (dict(pos_dim=30), dict(normalization="minmax"), dict(epochs=0), dict(layers=[]), dict(lr=0),
                dict(feature_dtype="int8"), dict(device="tpu-x")):
        with pytest.raises(CFlowError):
            CFlow(**bad)
    if not torch.cuda.is_available():
        with pytest.raises(CFlowError, match="CUDA is not available"):
            CFlow(device="cuda", epochs=1).fit(data["train"])


def test_float16_feature_storage(data):
    m16 = CFlow(layers=[2], coupling_blocks=2, epochs=1, feature_dtype="float16").fit(data["train"])
    m32 = CFlow(layers=[2], coupling_blocks=2, epochs=1).fit(data["train"])
    assert m16.history_["epoch_losses"][0] == pytest.approx(m32.history_["epoch_losses"][0], rel=1e-2)


def test_cost_counts_training_evaluation_and_test_passes():
    """FLOPs by hand for one layer (C = 6: halves 3 + 3, condition 8): subnet 11 -> 22 -> 6 and a 6 x 6 rotation."""
    per_block = 2 * 11 * 22 + 2 * 22 * 6 + 2 * 6 * 6
    assert flow_flops_per_fibre(6, 8, 2) == 2 * per_block
    from adspine.methods.base import CostShape

    shape = CostShape(n_train=5, n_test=3, positions=[16, 4], channels=[6, 10], d=16, backbone_flops=1e9)
    settings = dict(coupling_blocks=2, pos_dim=8, epochs=4, layers=[0])
    assert cflow_cost(shape, settings) == ((3 * 4 + 1) * 5 + 3) * 16 * 2 * per_block
    assert CFlow.info.cost is cflow_cost and CFlow.info.trains and CFlow.info.seed_setting == "seed"


def test_positional_encoding_layout():
    pe = positional_encoding_2d(8, 3, 5)
    assert pe.shape == (8, 3, 5)
    x = torch.arange(5.0)
    y = torch.arange(3.0)
    # channels 0..3 encode the column (frequencies 1 and 1e-2), 4..7 the row
    torch.testing.assert_close(pe[0], torch.sin(x).expand(3, 5))
    torch.testing.assert_close(pe[1], torch.cos(x).expand(3, 5))
    torch.testing.assert_close(pe[2], torch.sin(x * 1e-2).expand(3, 5))
    torch.testing.assert_close(pe[4], torch.sin(y)[:, None].expand(3, 5))
    torch.testing.assert_close(pe[7], torch.cos(y * 1e-2)[:, None].expand(3, 5))
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 2, 2)


def test_flow_is_invertible_with_rotations_and_exact_likelihood():
    gen = torch.Generator().manual_seed(3)
    flow = build_flow(12, 8, 3, 1.9, gen).double()
    for block in flow.module_list:
        w = block.w_perm.squeeze()
        torch.testing.assert_close(w @ w.T, torch.eye(12, dtype=w.dtype))
        assert torch.linalg.det(w) == pytest.approx(1.0)
        torch.testing.assert_close(block.w_perm_inv.squeeze(), w.T)
    x = torch.randn(5, 12, dtype=torch.float64, generator=gen)
    c = torch.randn(5, 8, dtype=torch.float64, generator=gen)
    z, ljd = flow(x, [c])
    back, _ = flow(z, [c], rev=True)
    torch.testing.assert_close(back, x)
    # log p(x) per dim = (sum of standard-normal log densities of z + log|det J|) / C; check det J numerically
    # (the rotations are stored in float32, so their determinant is 1 only to ~1e-7 per block)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None], [c[:1]])[0][0], x[0])
    torch.testing.assert_close(ljd[0], torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-5)
    expected = (torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1) + ljd) / 12
    torch.testing.assert_close(log_likelihood_per_dim(flow, x, c), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of a CUDA-trained model")
def test_cuda_trained_model_loads_on_cpu(tmp_path, data, fitted, caplog):
    model, _ = fitted
    folder = model.save(tmp_path / "m")
    meta = json.loads((folder / "model.json").read_text())
    meta["settings"]["device"] = "cuda"
    (folder / "model.json").write_text(json.dumps(meta))
    from safetensors.torch import load_file, save_file

    path = str(folder / "model.safetensors")
    save_file(load_file(path), path, metadata={"adspine_meta_sha256": meta_digest(meta)})  # as if saved on CUDA
    with caplog.at_level("WARNING", logger="adspine.methods.cflow"):
        loaded = AnomalyMethod.load(folder)
    assert loaded.device == "cpu" and "loaded on the CPU" in caplog.text
    p0, p1 = model.predict(data["test"], (SIZE, SIZE)), loaded.predict(data["test"], (SIZE, SIZE))
    assert np.array_equal(p0.maps, p1.maps)
