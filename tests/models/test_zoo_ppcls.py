"""PaddleClas ShuffleNetV2 zoo entries: architecture, .pdparams loading (Paddle's key layout, safe unpickling), ONNX.

The real ``*_pretrained.pdparams`` cannot be downloaded here, so files in PaddleClas's exact layout are written by
this test: the layer list below is derived from PaddleClas v2.4.0's ``shufflenet_v2.py`` independently of
``quantize.models.ppcls_shufflenet``, and a small functional re-implementation of PaddleClas's forward pass on those
arrays (Paddle semantics: [in, out] fc weight, BN eps 1e-5) is the reference the loaded models must reproduce.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from quantize.config import ModelConfig, model_entry
from quantize.core.errors import ModelError
from quantize.models.registry import available_archs, build_model, get_arch
from quantize.models.pdparams import NAME_TABLE_KEY, load_pdparams
from quantize.models.ppcls_shufflenet import PPCLS_SHUFFLENETS, convert_ppcls_state_dict, paddle_key_map

from conftest import SHARED_IMAGENET

ENTRIES = ["ppcls_shufflenet_v2_x0_25", "ppcls_shufflenet_v2_x0_33", "ppcls_shufflenet_v2_x0_5",
           "ppcls_shufflenet_v2_x1_0", "ppcls_shufflenet_v2_x1_5", "ppcls_shufflenet_v2_x2_0",
           "ppcls_shufflenet_v2_swish"]
URL = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/{}_pretrained.pdparams"

# PaddleClas ShuffleNet(scale, act): stage_out_channels[1:] and activation. x2.0: the published weights' 224.
PADDLE_ARCH = {
    "ppcls_shufflenet_v2_x0_25": ((24, 24, 48, 96, 512), "relu"),
    "ppcls_shufflenet_v2_x0_33": ((24, 32, 64, 128, 512), "relu"),
    "ppcls_shufflenet_v2_x0_5": ((24, 48, 96, 192, 1024), "relu"),
    "ppcls_shufflenet_v2_x1_0": ((24, 116, 232, 464, 1024), "relu"),
    "ppcls_shufflenet_v2_x1_5": ((24, 176, 352, 704, 1024), "relu"),
    "ppcls_shufflenet_v2_x2_0": ((24, 224, 488, 976, 2048), "relu"),
    "ppcls_shufflenet_v2_x2_0_w244": ((24, 244, 488, 976, 2048), "relu"),
    "ppcls_shufflenet_v2_swish": ((24, 116, 232, 464, 1024), "swish"),
}

# What a paddle.save(ShuffleNetV2_x1_0().state_dict()) file holds for the stem, the first (downsampling) unit, the
# first unit of the other kind and the head: structured key -> (parameter name in StructuredToParameterName@@,
# shape). Written out by hand from PaddleClas v2.4.0's ConvBNLayer / InvertedResidualDS / InvertedResidual / ShuffleNet.
X1_0_KEYS = {
    "_conv1._conv.weight": ("stage1_conv_weights", (24, 3, 3, 3)),
    "_conv1._batch_norm.weight": ("stage1_conv_bn_scale", (24,)),
    "_conv1._batch_norm.bias": ("stage1_conv_bn_offset", (24,)),
    "_conv1._batch_norm._mean": ("stage1_conv_bn_mean", (24,)),
    "_conv1._batch_norm._variance": ("stage1_conv_bn_variance", (24,)),
    "2_1._conv_dw_1._conv.weight": ("stage_2_1_conv4_weights", (24, 1, 3, 3)),
    "2_1._conv_dw_1._batch_norm.weight": ("stage_2_1_conv4_bn_scale", (24,)),
    "2_1._conv_dw_1._batch_norm.bias": ("stage_2_1_conv4_bn_offset", (24,)),
    "2_1._conv_dw_1._batch_norm._mean": ("stage_2_1_conv4_bn_mean", (24,)),
    "2_1._conv_dw_1._batch_norm._variance": ("stage_2_1_conv4_bn_variance", (24,)),
    "2_1._conv_linear_1._conv.weight": ("stage_2_1_conv5_weights", (58, 24, 1, 1)),
    "2_1._conv_linear_1._batch_norm.weight": ("stage_2_1_conv5_bn_scale", (58,)),
    "2_1._conv_linear_1._batch_norm.bias": ("stage_2_1_conv5_bn_offset", (58,)),
    "2_1._conv_linear_1._batch_norm._mean": ("stage_2_1_conv5_bn_mean", (58,)),
    "2_1._conv_linear_1._batch_norm._variance": ("stage_2_1_conv5_bn_variance", (58,)),
    "2_1._conv_pw_2._conv.weight": ("stage_2_1_conv1_weights", (58, 24, 1, 1)),
    "2_1._conv_pw_2._batch_norm.weight": ("stage_2_1_conv1_bn_scale", (58,)),
    "2_1._conv_pw_2._batch_norm.bias": ("stage_2_1_conv1_bn_offset", (58,)),
    "2_1._conv_pw_2._batch_norm._mean": ("stage_2_1_conv1_bn_mean", (58,)),
    "2_1._conv_pw_2._batch_norm._variance": ("stage_2_1_conv1_bn_variance", (58,)),
    "2_1._conv_dw_2._conv.weight": ("stage_2_1_conv2_weights", (58, 1, 3, 3)),
    "2_1._conv_dw_2._batch_norm.weight": ("stage_2_1_conv2_bn_scale", (58,)),
    "2_1._conv_dw_2._batch_norm.bias": ("stage_2_1_conv2_bn_offset", (58,)),
    "2_1._conv_dw_2._batch_norm._mean": ("stage_2_1_conv2_bn_mean", (58,)),
    "2_1._conv_dw_2._batch_norm._variance": ("stage_2_1_conv2_bn_variance", (58,)),
    "2_1._conv_linear_2._conv.weight": ("stage_2_1_conv3_weights", (58, 58, 1, 1)),
    "2_1._conv_linear_2._batch_norm.weight": ("stage_2_1_conv3_bn_scale", (58,)),
    "2_1._conv_linear_2._batch_norm.bias": ("stage_2_1_conv3_bn_offset", (58,)),
    "2_1._conv_linear_2._batch_norm._mean": ("stage_2_1_conv3_bn_mean", (58,)),
    "2_1._conv_linear_2._batch_norm._variance": ("stage_2_1_conv3_bn_variance", (58,)),
    "2_2._conv_pw._conv.weight": ("stage_2_2_conv1_weights", (58, 58, 1, 1)),
    "2_2._conv_dw._conv.weight": ("stage_2_2_conv2_weights", (58, 1, 3, 3)),
    "2_2._conv_linear._conv.weight": ("stage_2_2_conv3_weights", (58, 58, 1, 1)),
    "2_2._conv_linear._batch_norm._variance": ("stage_2_2_conv3_bn_variance", (58,)),
    "4_4._conv_linear._batch_norm._variance": ("stage_4_4_conv3_bn_variance", (232,)),
    "_last_conv._conv.weight": ("conv5_weights", (1024, 464, 1, 1)),
    "_last_conv._batch_norm.weight": ("conv5_bn_scale", (1024,)),
    "_last_conv._batch_norm.bias": ("conv5_bn_offset", (1024,)),
    "_last_conv._batch_norm._mean": ("conv5_bn_mean", (1024,)),
    "_last_conv._batch_norm._variance": ("conv5_bn_variance", (1024,)),
    "_fc.weight": ("fc6_weights", (1024, 1000)),
    "_fc.bias": ("fc6_offset", (1000,)),
}
N_CONV_BN = 1 + 3 * 5 + (3 + 7 + 3) * 3 + 1  # stem, 3 downsampling units, 13 basic units, head conv
N_KEYS = 5 * N_CONV_BN + 2


# --- PaddleClas layout, written independently of quantize.models.ppcls_shufflenet -------------------------------

def _paddle_layers(channels):
    """(structured prefix, parameter prefix, in, out, kernel, groups) of every ConvBNLayer, in registration order."""
    stem, *stages, head = channels
    layers = [("_conv1", "stage1_conv", 3, stem, 3, 1)]
    cin = stem
    for stage, repeats, cout in zip((2, 3, 4), (4, 8, 4), stages):
        half = cout // 2
        for i in range(1, repeats + 1):
            unit, p = f"{stage}_{i}", f"stage_{stage}_{i}"
            if i == 1:
                layers += [(f"{unit}._conv_dw_1", f"{p}_conv4", cin, cin, 3, cin),
                           (f"{unit}._conv_linear_1", f"{p}_conv5", cin, half, 1, 1),
                           (f"{unit}._conv_pw_2", f"{p}_conv1", cin, half, 1, 1),
                           (f"{unit}._conv_dw_2", f"{p}_conv2", half, half, 3, half),
                           (f"{unit}._conv_linear_2", f"{p}_conv3", half, half, 1, 1)]
            else:
                layers += [(f"{unit}._conv_pw", f"{p}_conv1", half, half, 1, 1),
                           (f"{unit}._conv_dw", f"{p}_conv2", half, half, 3, half),
                           (f"{unit}._conv_linear", f"{p}_conv3", half, half, 1, 1)]
        cin = cout
    layers.append(("_last_conv", "conv5", cin, head, 1, 1))
    return layers


def paddle_state(channels, seed=0, num_classes=1000):
    """(arrays by structured name, StructuredToParameterName@@ table) as paddle.save(model.state_dict()) writes."""
    rng = np.random.default_rng(seed)
    arrays, names = {}, {}
    for structured, param, cin, cout, k, groups in _paddle_layers(channels):
        fan_in = cin // groups * k * k
        entries = [("._conv.weight", "_weights", rng.normal(0, np.sqrt(2 / fan_in), (cout, cin // groups, k, k))),
                   ("._batch_norm.weight", "_bn_scale", rng.uniform(0.5, 1.5, cout)),
                   ("._batch_norm.bias", "_bn_offset", rng.normal(0, 0.1, cout)),
                   ("._batch_norm._mean", "_bn_mean", rng.normal(0, 0.1, cout)),
                   ("._batch_norm._variance", "_bn_variance", rng.uniform(0.5, 1.5, cout))]
        for suffix, param_suffix, value in entries:
            arrays[structured + suffix] = value.astype(np.float32)
            names[structured + suffix] = param + param_suffix
    arrays["_fc.weight"] = rng.normal(0, 0.02, (channels[-1], num_classes)).astype(np.float32)  # [in, out]
    arrays["_fc.bias"] = rng.normal(0, 0.02, num_classes).astype(np.float32)
    names.update({"_fc.weight": "fc6_weights", "_fc.bias": "fc6_offset"})
    return arrays, names


def write_pdparams(path: Path, obj: dict) -> Path:
    """Pickle like Paddle 2.x (protocol 2) with numpy 1.x's module path for _reconstruct, as the real files have."""
    data = pickle.dumps(obj, protocol=2)
    data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data
    path.write_bytes(data)
    return path


def paddle_file(tmp_path: Path, arch: str, seed=0, naming="structured") -> tuple[Path, dict]:
    arrays, names = paddle_state(PADDLE_ARCH[arch][0], seed)
    if naming == "structured":
        obj = {**arrays, NAME_TABLE_KEY: names}
    else:
        obj = {names[k]: v for k, v in arrays.items()}
    return write_pdparams(tmp_path / f"{arch}_{naming}.pdparams", obj), arrays


def paddle_forward(arrays, act, x):
    """PaddleClas ShuffleNet.forward on Paddle-named arrays, written with torch functionals."""
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}

    def conv_bn(y, prefix, stride, depthwise, activate):
        w = t[prefix + "._conv.weight"]
        y = F.conv2d(y, w, stride=stride, padding=w.shape[-1] // 2, groups=y.shape[1] if depthwise else 1)
        y = F.batch_norm(y, t[prefix + "._batch_norm._mean"], t[prefix + "._batch_norm._variance"],
                         t[prefix + "._batch_norm.weight"], t[prefix + "._batch_norm.bias"], False, 0.0, 1e-5)
        if not activate:
            return y
        return F.relu(y) if act == "relu" else y * torch.sigmoid(y)

    def shuffle(y):
        b, c, h, w = y.shape
        return y.reshape(b, 2, c // 2, h, w).permute(0, 2, 1, 3, 4).reshape(b, c, h, w)

    y = F.max_pool2d(conv_bn(x, "_conv1", 2, False, True), 3, 2, 1)
    for stage, repeats in zip((2, 3, 4), (4, 8, 4)):
        for i in range(1, repeats + 1):
            u = f"{stage}_{i}"
            if i == 1:
                left = conv_bn(conv_bn(y, u + "._conv_dw_1", 2, True, False), u + "._conv_linear_1", 1, False, True)
                right = conv_bn(y, u + "._conv_pw_2", 1, False, True)
                right = conv_bn(right, u + "._conv_dw_2", 2, True, False)
                right = conv_bn(right, u + "._conv_linear_2", 1, False, True)
            else:
                left, right = torch.split(y, y.shape[1] // 2, dim=1)
                right = conv_bn(right, u + "._conv_pw", 1, False, True)
                right = conv_bn(conv_bn(right, u + "._conv_dw", 1, True, False), u + "._conv_linear", 1, False, True)
            y = shuffle(torch.cat([left, right], dim=1))
    y = conv_bn(y, "_last_conv", 1, False, True).mean(dim=(2, 3))
    return y @ t["_fc.weight"] + t["_fc.bias"]


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 summation order (different conv algorithms): 1e-5 of the logits' scale."""
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


def _x(batch=2, seed=1, size=128):
    """Random input; 128x128 keeps the weight-equivalence tests cheap (the nets take any size, 224 is not needed)."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _entry(name: str) -> ModelConfig:
    return OmegaConf.to_object(model_entry(name))  # conf/model/NAME.yaml with its preprocessing block


# --- entries and architecture --------------------------------------------------------------------------------------

def test_entries_are_registered_with_paddleclas_urls():
    assert set(ENTRIES) | {"ppcls_shufflenet_v2_x2_0_w244"} <= set(available_archs())
    paddle_names = {"x0_25": "ShuffleNetV2_x0_25", "x0_33": "ShuffleNetV2_x0_33", "x0_5": "ShuffleNetV2_x0_5",
                    "x1_0": "ShuffleNetV2_x1_0", "x1_5": "ShuffleNetV2_x1_5", "x2_0": "ShuffleNetV2_x2_0",
                    "swish": "ShuffleNetV2_swish"}
    for name in ENTRIES:
        entry = _entry(name)
        url = URL.format(paddle_names[name.rsplit("_v2_", 1)[1]])
        assert entry.name == entry.arch == name and entry.source == "ppcls" and entry.pretrained
        assert entry.weights_url == url == PPCLS_SHUFFLENETS[name][3] == get_arch(name).default_weights()
        assert entry.reference.flops_kind == "paddle_flops" and 40 < entry.reference.top1 < entry.reference.top5 < 100
        # PaddleClas's eval: cv2.resize to round(side * 256 / short), crop offset (side - 224) // 2, RGB, ImageNet norm
        pre = entry.preprocess
        assert (pre.backend, pre.interpolation, pre.resize_rounding, pre.crop_rounding, pre.color) == \
            ("opencv", "bilinear", "round", "floor", "rgb")
    assert get_arch("ppcls_shufflenet_v2_x2_0_w244").default_weights is None  # no published 244-wide weights
    assert _entry("ppcls_shufflenet_v2_swish").reference.top1 == pytest.approx(70.03)


def _paddle_flops_hooks(model: torch.nn.Module, counter: list) -> list:
    """Count as paddle.flops() (Paddle 2.2 hapi/dynamic_flops.py) does: conv/fc MACs, 2 per BatchNorm input
    element, (H*W + 1) per adaptive-average-pool output element; activations and max pooling count nothing."""
    def hook(m, inputs, out):
        if isinstance(m, torch.nn.Conv2d):
            counter[0] += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.BatchNorm2d):
            counter[0] += 2 * inputs[0].numel()
        elif isinstance(m, torch.nn.Linear):
            counter[0] += m.in_features * out.numel()
        elif isinstance(m, torch.nn.AdaptiveAvgPool2d):
            counter[0] += (inputs[0].shape[2] * inputs[0].shape[3] + 1) * out.numel()
    return [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]


@pytest.mark.parametrize("name", ENTRIES)
def test_random_init_output_and_params_match_table(name):
    model = build_model(name, pretrained=False)
    ops = [0]
    handles = _paddle_flops_hooks(model, ops)
    with torch.inference_mode():
        out = model(_x(1, size=224))
    for handle in handles:
        handle.remove()
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    # PaddleClas's FLOPs column is paddle.flops(): reproduced to 0.1% (x2.0 only with the published weights' 224).
    assert ops[0] / 1e6 == pytest.approx(_entry(name).reference.flops_m, rel=1e-3)
    # PaddleClas's Params column (paddle.flops) counts BN running mean/variance too: Paddle stores them as parameters.
    params = sum(p.numel() for p in model.parameters())
    bn_stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    table = _entry(name).reference.params_m * 1e6
    assert abs(params + bn_stats - table) <= 0.01 * table
    assert abs(params - table) <= 0.011 * table  # trainable only: x0.25 is 0.604 M vs 0.61 M
    acts = {type(m).__name__ for m in model.modules()}
    assert ("SiLU" in acts) == (name == "ppcls_shufflenet_v2_swish") and ("ReLU" in acts) != ("SiLU" in acts)


def test_x2_0_widths():
    stage2 = lambda arch: build_model(arch, pretrained=False).stage2[0].pw2.conv.weight.shape[0] * 2  # noqa: E731
    assert stage2("ppcls_shufflenet_v2_x2_0") == 224  # the published weights (pre-v2.4.0 code, paddle.vision)
    assert stage2("ppcls_shufflenet_v2_x2_0_w244") == 244  # the v2.4.0 code


# --- PaddleClas key layout -----------------------------------------------------------------------------------------

def test_paddle_layout_is_paddleclas(tmp_path):
    path, arrays = paddle_file(tmp_path, "ppcls_shufflenet_v2_x1_0")
    raw = pickle.loads(path.read_bytes())  # our own file: plain pickle is fine here
    names = raw[NAME_TABLE_KEY]
    for key, (param_name, shape) in X1_0_KEYS.items():
        assert arrays[key].shape == shape, key
        assert names[key] == param_name
    assert len(arrays) == N_KEYS == 282
    assert set(arrays) == set(paddle_key_map("structured"))
    assert set(names.values()) == set(paddle_key_map("parameter"))
    # What the loader returns: the arrays (float32, Paddle shapes), without the name table.
    loaded = load_pdparams(path)
    assert list(loaded) == list(arrays)
    assert all(loaded[k].dtype == np.float32 and np.array_equal(loaded[k], arrays[k]) for k in arrays)


@pytest.mark.parametrize("name", ENTRIES + ["ppcls_shufflenet_v2_x2_0_w244"])
def test_pdparams_checkpoint_reproduces_paddleclas_forward(tmp_path, name):
    path, arrays = paddle_file(tmp_path, name, seed=len(name))
    model = build_model(name, pretrained=False, checkpoint=str(path))
    x = _x()
    with torch.inference_mode():
        got, want = model(x), paddle_forward(arrays, PADDLE_ARCH[name][1], x)
    assert_same_logits(got, want)
    assert torch.equal(model.fc.weight, torch.from_numpy(arrays["_fc.weight"]).t())  # [in, out] -> [out, in]
    assert torch.equal(model.stage2[0].proj_dw.bn.running_var,
                       torch.from_numpy(arrays["2_1._conv_dw_1._batch_norm._variance"]))


def test_parameter_names_and_our_layout_also_load(tmp_path):
    name = "ppcls_shufflenet_v2_x0_5"
    structured, _ = paddle_file(tmp_path, name, seed=3)
    by_param, arrays = paddle_file(tmp_path, name, seed=3, naming="parameter")
    a = build_model(name, pretrained=False, checkpoint=str(structured))
    b = build_model(name, pretrained=False, checkpoint=str(by_param))
    ours = tmp_path / "ours.pth"
    torch.save(a.state_dict(), ours)
    c = build_model(name, pretrained=False, checkpoint=str(ours))
    sd = a.state_dict()
    assert convert_ppcls_state_dict(sd).keys() == sd.keys()  # our layout passes unchanged
    x = _x()
    with torch.inference_mode():
        want = paddle_forward(arrays, "relu", x)
        for model in (a, b, c):
            assert_same_logits(model(x), want)


def _error(tmp_path, name, obj) -> str:
    path = write_pdparams(tmp_path / "bad.pdparams", obj)
    with pytest.raises(ModelError) as info:
        build_model(name, pretrained=False, checkpoint=str(path))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_and_unexpected_paddle_keys_are_named(tmp_path):
    arrays, names = paddle_state(PADDLE_ARCH["ppcls_shufflenet_v2_x1_0"][0])
    del arrays["2_1._conv_dw_1._batch_norm._mean"]
    arrays["2_1._conv_dw_1._batch_norm._mean_typo"] = np.zeros(24, np.float32)
    msg = _error(tmp_path, "ppcls_shufflenet_v2_x1_0", {**arrays, NAME_TABLE_KEY: names})
    assert "1 missing key (2_1._conv_dw_1._batch_norm._mean)" in msg
    assert "1 unexpected key (2_1._conv_dw_1._batch_norm._mean_typo)" in msg
    arrays, _ = paddle_state(PADDLE_ARCH["ppcls_shufflenet_v2_x1_0"][0])
    del arrays["_fc.bias"]
    assert "1 missing key (_fc.bias)" in _error(tmp_path, "ppcls_shufflenet_v2_x1_0", arrays)


def test_wrong_scale_and_x2_0_width_are_refused(tmp_path):
    arrays, _ = paddle_state(PADDLE_ARCH["ppcls_shufflenet_v2_x0_5"][0])
    msg = _error(tmp_path, "ppcls_shufflenet_v2_x1_0", arrays)
    assert "wrong shape" in msg and "ppcls_shufflenet_v2_x1_0" in msg and "vs model" in msg
    arrays, _ = paddle_state(PADDLE_ARCH["ppcls_shufflenet_v2_x2_0"][0])  # 224 wide, as published
    msg = _error(tmp_path, "ppcls_shufflenet_v2_x2_0_w244", arrays)
    assert "stage-2 width of 224" in msg and "use model.arch=ppcls_shufflenet_v2_x2_0 " in msg
    arrays, _ = paddle_state(PADDLE_ARCH["ppcls_shufflenet_v2_x2_0_w244"][0])
    assert "use model.arch=ppcls_shufflenet_v2_x2_0_w244" in _error(tmp_path, "ppcls_shufflenet_v2_x2_0", arrays)


def test_unreadable_pdparams(tmp_path):
    text = tmp_path / "notes.pdparams"
    text.write_text("not weights\n")
    with pytest.raises(ModelError, match="not a valid .pdparams file"):
        build_model("ppcls_shufflenet_v2_x0_25", pretrained=False, checkpoint=str(text))
    empty = tmp_path / "names_only.pdparams"
    empty.write_bytes(pickle.dumps({NAME_TABLE_KEY: {"a": "b"}}, protocol=2))
    with pytest.raises(ModelError, match="holds no parameter arrays"):
        load_pdparams(empty)
    with pytest.raises(ModelError, match="does not exist"):
        build_model("ppcls_shufflenet_v2_x0_25", pretrained=False, checkpoint=str(tmp_path / "nope.pdparams"))


# --- unsafe pickles -------------------------------------------------------------------------------------------------

class _Reduce:
    """Unpickling this calls ``fn(*args)``: what a malicious weights file does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pdparams_is_refused_not_executed(tmp_path, protocol):
    marker = tmp_path / "pwned_x"
    path = tmp_path / "evil.pdparams"
    obj = {"_conv1._conv.weight": np.zeros((24, 3, 3, 3), np.float32), "payload": _Reduce(os.system, f"touch {marker}")}
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    with pytest.raises(ModelError) as info:
        build_model("ppcls_shufflenet_v2_x0_25", pretrained=False, checkpoint=str(path))
    msg = str(info.value)
    assert not marker.exists()
    assert f"{os.system.__module__}.system" in msg and "refusing to load" in msg and "\n" not in msg


@pytest.mark.parametrize("payload,refused", [
    (_Reduce(eval, "__import__('os')"), "builtins.eval"),
    (_Reduce(shutil.rmtree, "/nonexistent"), "shutil.rmtree"),
    (_Reduce(np.load, "/etc/passwd"), "numpy.load"),
])
def test_other_globals_are_refused(tmp_path, payload, refused):
    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps({"w": np.zeros(2, np.float32), "x": payload}, protocol=4))
    with pytest.raises(ModelError, match=f"calls {refused.replace('.', '[.]')}"):
        load_pdparams(path)


def test_allowed_helpers_cannot_be_abused(tmp_path):
    import codecs

    for payload in (_Reduce(codecs.encode, "x", "rot13"), _Reduce(bytes, 10**12)):
        path = tmp_path / "abuse.pdparams"
        path.write_bytes(pickle.dumps({"w": payload}, protocol=2))
        with pytest.raises(ModelError, match="not a valid .pdparams file"):
            load_pdparams(path)
    obj_array = tmp_path / "objects.pdparams"
    obj_array.write_bytes(pickle.dumps({"w": np.array([1, "a"], dtype=object)}, protocol=2))
    with pytest.raises(ModelError, match="non-numeric arrays"):  # unpicklable with the allowed globals; never weights
        load_pdparams(obj_array)


def test_protocol_2_edge_cases_load(tmp_path):
    path = write_pdparams(tmp_path / "edge.pdparams", {"empty": np.zeros((0, 3), np.float32),
                                                      "big_endian": np.arange(4, dtype=">f4"),
                                                      "int": np.arange(3, dtype=np.int64)})
    loaded = load_pdparams(path)
    assert loaded["empty"].shape == (0, 3) and loaded["int"].tolist() == [0, 1, 2]
    from quantize.models.checkpoint import load_state_dict_file

    tensors = load_state_dict_file(path)
    assert tensors["big_endian"].tolist() == [0.0, 1.0, 2.0, 3.0]


# --- pretrained=True: download through torch.hub's cache -----------------------------------------------------------

def test_default_url_is_downloaded_once_and_loaded(tmp_path, monkeypatch):
    name = "ppcls_shufflenet_v2_x0_25"
    source, arrays = paddle_file(tmp_path, name, seed=5)
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst).name, hash_prefix))
        shutil.copyfile(source, dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    x = _x()
    for _ in range(2):
        model = build_model(name, pretrained=True)
        with torch.inference_mode():
            assert_same_logits(model(x), paddle_forward(arrays, "relu", x))
    url = URL.format("ShuffleNetV2_x0_25")
    assert calls == [(url, "ShuffleNetV2_x0_25_pretrained.pdparams", None)]  # second build: from the cache
    assert (tmp_path / "hub" / "checkpoints" / "ShuffleNetV2_x0_25_pretrained.pdparams").is_file()


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError) as info:
        build_model("ppcls_shufflenet_v2_x1_0", pretrained=True)
    msg = str(info.value)
    assert msg.startswith("cannot download weights from URL: ") and "\n" not in msg
    assert "Temporary failure in name resolution" in msg
    assert URL.format("ShuffleNetV2_x1_0") in msg


# --- ONNX export ----------------------------------------------------------------------------------------------------

def _photos(n=4) -> torch.Tensor:
    from quantize.data.preprocess import Preprocess, load_rgb, preprocess

    files = sorted((SHARED_IMAGENET / "sample").glob("*/*.JPEG"))[:n]
    if len(files) < n:
        pytest.skip("shared ImageNet sample photos are absent")
    p = Preprocess.from_config(model_entry("ppcls_shufflenet_v2_x1_0").preprocess)  # PaddleClas's own eval transform
    return torch.from_numpy(np.stack([preprocess(load_rgb(f), p) for f in files]))


def _with_photo_statistics(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Random weights with BN statistics measured on real photos: activations (and logits) of a trained net's scale."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize("name", ENTRIES)
def test_onnx_export_matches_torch_on_photos(tmp_path, name):
    import onnx
    import onnxruntime as ort

    x = _photos()
    model = _with_photo_statistics(build_model(name, pretrained=False), x)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, x[:1], str(path), opset_version=11, dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version == 11
    ops = {n.op_type for n in graph.graph.node}
    assert ("Sigmoid" in ops) == (name == "ppcls_shufflenet_v2_swish")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy()})[0]  # batch 4 through a graph exported with batch 1
    with torch.inference_mode():
        want = model(x).numpy()
    assert got.shape == (4, 1000)
    assert np.abs(got - want).max() < 1e-4
