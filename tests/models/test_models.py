"""Model registry, weight loading (checkpoints, URLs, packaged Lite0 weights) and ONNX exportability."""

from __future__ import annotations

import pathlib
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from conftest import SHARED_IMAGENET
from quantize.core.errors import ModelError
from quantize.models.registry import available_archs, build_model
from quantize.models.checkpoint import load_into, load_state_dict_file
from quantize.models.efficientnet_lite import EfficientNetLite, packaged_lite0_weights, tf_same_padding
from quantize.models.torchvision_models import TORCHVISION_WEIGHTS

IMAGENET = SHARED_IMAGENET  # ../shared, or $QUANTIZE_SHARED
SHUFFLENETS = ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"]


def _random_shufflenet(seed: int = 123) -> torch.nn.Module:
    """A ShuffleNet with weights and BN statistics unlike build_model's seed-0 init."""
    torch.manual_seed(seed)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)
    return model.eval()


def _x(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# --- registry ------------------------------------------------------------------------------------------------

def test_registry_lists_expected_archs():
    assert set(SHUFFLENETS) | {"efficientnet_lite0"} <= set(available_archs())
    assert available_archs() == sorted(available_archs())


@pytest.mark.parametrize("arch", available_archs())
def test_random_init_builds_and_is_reproducible(arch):
    a = build_model(arch, pretrained=False)
    b = build_model(arch, pretrained=False)
    assert not a.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.inference_mode():
        out = a(_x())
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


def test_random_init_leaves_global_rng_alone():
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    build_model("shufflenet_v2_x0_5", pretrained=False)
    assert torch.equal(torch.rand(3), expected)


def test_num_classes():
    model = build_model("efficientnet_lite0", pretrained=False, num_classes=10)
    with torch.inference_mode():
        assert model(_x()).shape == (2, 10)


def test_unknown_arch_lists_available():
    with pytest.raises(ModelError) as info:
        build_model("resnet9000", pretrained=False)
    msg = str(info.value)
    assert "resnet9000" in msg and "\n" not in msg
    for arch in available_archs():
        assert arch in msg


def test_torchvision_weights_table():
    assert set(TORCHVISION_WEIGHTS) == set(SHUFFLENETS)
    import torchvision

    for name, info in TORCHVISION_WEIGHTS.items():
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        metrics = weights.meta["_metrics"]["ImageNet-1K"]
        assert info["url"] == weights.url
        assert (info["top1"], info["top5"]) == (metrics["acc@1"], metrics["acc@5"])


# --- local checkpoints ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_checkpoint_roundtrip(tmp_path, wrap):
    original = _random_shufflenet()
    state = original.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    loaded = build_model("shufflenet_v2_x0_5", pretrained=True, checkpoint=str(path))  # checkpoint wins
    x = _x()
    with torch.inference_mode():
        assert torch.equal(loaded(x), original(x))


def test_checkpoint_with_prefixed_keys(tmp_path):
    state = {f"module.{k}": v for k, v in _random_shufflenet().state_dict().items()}
    path = tmp_path / "ddp.pth"
    torch.save(state, path)
    with pytest.raises(ModelError) as info:
        build_model("shufflenet_v2_x0_5", pretrained=False, checkpoint=str(path))
    msg = str(info.value)
    n = len(state)
    assert f"{n} missing keys" in msg and f"{n} unexpected keys" in msg
    assert "conv1.0.weight" in msg and "module.conv1.0.weight" in msg
    assert "shufflenet_v2_x0_5" in msg and "ddp.pth" in msg and "\n" not in msg


def test_checkpoint_with_wrong_shape(tmp_path):
    state = _random_shufflenet().state_dict()
    state["fc.weight"] = torch.zeros(10, state["fc.weight"].shape[1])
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"fc\.weight: checkpoint \(10, 1024\) vs model \(1000, 1024\)"):
        build_model("shufflenet_v2_x0_5", pretrained=False, checkpoint=str(path))


def test_missing_num_batches_tracked_is_tolerated_but_other_keys_are_not():
    state = _random_shufflenet().state_dict()
    no_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = build_model("shufflenet_v2_x0_5", pretrained=False)
    load_into(model, no_counters, "test weights")
    assert torch.equal(model.state_dict()["conv1.1.running_var"], state["conv1.1.running_var"])
    del no_counters["conv1.1.running_var"]
    with pytest.raises(ModelError, match=r"1 missing key \(conv1\.1\.running_var\)"):
        load_into(model, no_counters, "test weights")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        build_model("shufflenet_v2_x0_5", pretrained=False, checkpoint=str(tmp_path / "nope.pth"))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(ModelError) as info:
        build_model("shufflenet_v2_x0_5", pretrained=False, checkpoint=str(path))
    assert "not a valid torch checkpoint" in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_without_tensors(tmp_path):
    path = tmp_path / "opt.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelError, match="not a state dict"):
        load_state_dict_file(path)


class _Payload:
    """Unpickling this would create a marker file: weights_only loading must refuse instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("use_torch_save", [True, False])
def test_unsafe_pickle_is_refused_not_executed(tmp_path, use_torch_save):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"conv1.0.weight": torch.zeros(1), "payload": _Payload(marker)}
    if use_torch_save:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(ModelError) as info:
        build_model("shufflenet_v2_x0_5", pretrained=False, checkpoint=str(path))
    assert not marker.exists()
    assert "\n" not in str(info.value)


# --- weights_url ---------------------------------------------------------------------------------------------

def test_weights_url_network_failure(monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ModelError) as info:
        build_model("shufflenet_v2_x0_5", pretrained=True, weights_url="https://example.invalid/w-1234abcd.pth")
    msg = str(info.value)
    assert msg.startswith("cannot download weights from URL: ")
    assert "Temporary failure in name resolution" in msg
    assert msg.endswith("pass model.checkpoint=PATH or model.pretrained=false") and "\n" not in msg


def test_weights_url_is_used(monkeypatch):
    original = _random_shufflenet()
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return {"state_dict": original.state_dict()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    url = "https://example.org/models/my_shufflenet.pth"
    model = build_model("shufflenet_v2_x0_5", pretrained=True, weights_url=url)
    assert calls[0][0] == url
    assert calls[0][1]["weights_only"] is True and calls[0][1]["map_location"] == "cpu"
    x = _x()
    with torch.inference_mode():
        assert torch.equal(model(x), original(x))


def test_default_torchvision_url_with_hash_check(monkeypatch):
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return _random_shufflenet().state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    build_model("shufflenet_v2_x0_5", pretrained=True)
    assert calls == [(TORCHVISION_WEIGHTS["shufflenet_v2_x0_5"]["url"],
                      {"map_location": "cpu", "weights_only": True, "check_hash": True})]


# --- EfficientNet-Lite0 --------------------------------------------------------------------------------------

def test_tf_same_padding():
    assert tf_same_padding(224, 3, 2) == (0, 1)
    assert tf_same_padding(56, 5, 2) == (1, 2)
    assert tf_same_padding(14, 3, 1) == (1, 1)
    assert tf_same_padding(225, 3, 2) == (1, 1)


def test_lite0_packaged_weights_load_strictly():
    state = load_state_dict_file(packaged_lite0_weights())
    assert len(state) == 296
    model = EfficientNetLite()
    assert model.state_dict().keys() == state.keys()
    model.load_state_dict(state, strict=True)


def _load_sample(transform):
    from PIL import Image

    synsets = [line.split()[0] for line in (IMAGENET / "synsets.txt").read_text().splitlines() if line.strip()]
    index = {s: i for i, s in enumerate(synsets)}
    files = sorted((IMAGENET / "sample").glob("*/*.JPEG"))
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(transform(im.convert("RGB")))
    return torch.stack(images), torch.tensor([index[f.parent.name] for f in files])


@pytest.mark.skipif(not (IMAGENET / "sample").is_dir() or not (IMAGENET / "synsets.txt").is_file(),
                    reason="shared ImageNet sample is absent")
def test_lite0_pretrained_accuracy_on_real_photos():
    """Fed as its TensorFlow release was trained ((x - 127) / 128, conf/model/preprocess/efficientnet_lite.yaml), the
    canary's weights get about 89-90% of the 200 photos; ImageNet mean/std (the old global default) gave 80.5."""
    from quantize.config import model_entry
    from quantize.data.preprocess import Preprocess, preprocess

    p = Preprocess.from_config(model_entry("efficientnet_lite0").preprocess)
    images, labels = _load_sample(lambda img: torch.from_numpy(preprocess(img, p)))
    assert len(labels) >= 100
    model = build_model("efficientnet_lite0", pretrained=True)
    preds = []
    with torch.inference_mode():
        for chunk in images.split(10):  # small batches: much faster than one huge batch on 2 cores
            preds.append(model(chunk).argmax(1))
    top1 = (torch.cat(preds) == labels).float().mean().item() * 100
    print(f"efficientnet_lite0 top-1 on {len(labels)} sample photos: {top1:.1f}%")
    assert top1 >= 88.0


# --- ONNX export ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["efficientnet_lite0", "shufflenet_v2_x0_5"])
def test_onnx_export_matches_torch(tmp_path, arch):
    import onnx
    import onnxruntime as ort

    model = build_model(arch, pretrained=arch == "efficientnet_lite0")
    x = _x()
    path = tmp_path / f"{arch}.onnx"
    torch.onnx.export(model, x, str(path), opset_version=11, dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    if arch == "efficientnet_lite0":
        # TF SAME padding of the 5 stride-2 convs: one Pad each, with constant pads (no shape-computing subgraph).
        ops = [n.op_type for n in graph.graph.node]
        assert ops.count("Pad") == 5 and "Slice" not in ops and "ConstantOfShape" not in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy()})[0]
    with torch.inference_mode():
        want = model(x).numpy()
    assert got.shape == (2, 1000)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("arch", sorted(SHUFFLENETS))
def test_torchvision_zoo_entries_carry_torchvision_published_figures(arch):
    """The YAML entries are typed by hand; torchvision's own weights metadata is the independent truth."""
    from omegaconf import OmegaConf

    import torchvision

    entry = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "model" / f"{arch}.yaml")
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    metrics = weights.meta["_metrics"]["ImageNet-1K"]
    assert entry.weights_url == weights.url
    assert (entry.reference.top1, entry.reference.top5) == (metrics["acc@1"], metrics["acc@5"])
