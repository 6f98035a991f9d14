"""Zoo entries re-implemented from mmcls v0.23.1 (ShuffleNetV2 1.0x, ShuffleNetV1 1.0x g3) and from Megvii's
ShuffleNet-Series (ShuffleNetV2 0.5x-2.0x): sizes against the published table, checkpoints in each source's own
key layout loading strictly, and ONNX export matching PyTorch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf

from conftest import SHARED_IMAGENET
from quantize.config import model_entry
from quantize.core.errors import ModelError
from quantize.models.registry import available_archs, build_model, get_arch
from quantize.models.mmcls_shufflenet import MMCLS_WEIGHTS
from quantize.data.preprocess import Preprocess, load_rgb, normalize_batch, preprocess

REPO = Path(__file__).resolve().parents[2]
SAMPLE = SHARED_IMAGENET / "sample"

MMCLS = ["mmcls_shufflenet_v2_x1_0", "mmcls_shufflenet_v1_x1_0_g3"]
MEGVII_SIZES = {"megvii_shufflenet_v2_x0_5": "0.5x", "megvii_shufflenet_v2_x1_0": "1.0x",
                "megvii_shufflenet_v2_x1_5": "1.5x", "megvii_shufflenet_v2_x2_0": "2.0x"}
ALL = MMCLS + list(MEGVII_SIZES)

# ../shared/reference/model_zoo.md: top1, top5, compute (M), compute convention, params (M)
TABLE = {
    "mmcls_shufflenet_v2_x1_0": (69.55, 88.92, 149.0, "flops", 2.28),
    # The table's header says MACs, but 146M is mmcls' mmcv-style count (MACs alone are 137.5M): see the YAML.
    "mmcls_shufflenet_v1_x1_0_g3": (68.13, 87.81, 146.0, "flops", 1.87),
    "megvii_shufflenet_v2_x0_5": (61.1, 82.6, 41.0, "macs", 1.4),
    "megvii_shufflenet_v2_x1_0": (69.4, 88.9, 146.0, "macs", 2.3),
    "megvii_shufflenet_v2_x1_5": (72.6, 90.6, 299.0, "macs", 3.5),
    "megvii_shufflenet_v2_x2_0": (75.0, 92.4, 591.0, "macs", 7.4),
}


# --- the sources' state-dict layouts, written from their model files ------------------------------------------

def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def _conv_module(prefix: str, cin: int, cout: int, k: int, groups: int = 1) -> dict[str, tuple[int, ...]]:
    """mmcv ConvModule(conv without bias, BN named 'bn')."""
    return {f"{prefix}.conv.weight": (cout, cin // groups, k, k)} | _bn(f"{prefix}.bn", cout)


def mmcls_v2_layout() -> dict[str, tuple[int, ...]]:
    keys = _conv_module("backbone.conv1", 3, 24, 3)
    cin = 24
    for stage, (cout, blocks) in enumerate(zip((116, 232, 464), (4, 8, 4))):
        half = cout // 2
        for b in range(blocks):
            p = f"backbone.layers.{stage}.{b}"
            if b == 0:
                keys |= _conv_module(f"{p}.branch1.0", cin, cin, 3, groups=cin)
                keys |= _conv_module(f"{p}.branch1.1", cin, half, 1)
            keys |= _conv_module(f"{p}.branch2.0", cin if b == 0 else half, half, 1)
            keys |= _conv_module(f"{p}.branch2.1", half, half, 3, groups=half)
            keys |= _conv_module(f"{p}.branch2.2", half, half, 1)
            cin = cout
    keys |= _conv_module("backbone.layers.3", 464, 1024, 1)
    return keys | {"head.fc.weight": (1000, 1024), "head.fc.bias": (1000,)}


def mmcls_v1_layout(groups: int = 3) -> dict[str, tuple[int, ...]]:
    keys = _conv_module("backbone.conv1", 3, 24, 3)
    cin = 24
    for stage, (cout, blocks) in enumerate(zip((240, 480, 960), (4, 8, 4))):
        for b in range(blocks):
            p = f"backbone.layers.{stage}.{b}"
            mid = cout // 4
            expand_out = cout - cin if b == 0 else cout
            keys |= _conv_module(f"{p}.g_conv_1x1_compress", cin, mid, 1, groups=1 if stage == b == 0 else groups)
            keys |= _conv_module(f"{p}.depthwise_conv3x3_bn", mid, mid, 3, groups=mid)
            keys |= _conv_module(f"{p}.g_conv_1x1_expand", mid, expand_out, 1, groups=groups)
            cin = cout
    return keys | {"head.fc.weight": (1000, 960), "head.fc.bias": (1000,)}


MEGVII_CHANNELS = {"0.5x": (48, 96, 192, 1024), "1.0x": (116, 232, 464, 1024),
                   "1.5x": (176, 352, 704, 1024), "2.0x": (244, 488, 976, 2048)}


def megvii_layout(size: str) -> dict[str, tuple[int, ...]]:
    """Megvii's nn.Sequential indices (ReLUs hold no state), under DataParallel's 'module.'."""
    m = "module."
    keys = {f"{m}first_conv.0.weight": (24, 3, 3, 3)} | _bn(f"{m}first_conv.1", 24)
    *stages, last = MEGVII_CHANNELS[size]
    cin, i = 24, 0
    for cout, blocks in zip(stages, (4, 8, 4)):
        mid = cout // 2
        for b in range(blocks):
            p = f"{m}features.{i}"
            inp = cin if b == 0 else cin // 2
            keys |= {f"{p}.branch_main.0.weight": (mid, inp, 1, 1)} | _bn(f"{p}.branch_main.1", mid)
            keys |= {f"{p}.branch_main.3.weight": (mid, 1, 3, 3)} | _bn(f"{p}.branch_main.4", mid)
            keys |= {f"{p}.branch_main.5.weight": (cout - inp, mid, 1, 1)} | _bn(f"{p}.branch_main.6", cout - inp)
            if b == 0:
                keys |= {f"{p}.branch_proj.0.weight": (inp, 1, 3, 3)} | _bn(f"{p}.branch_proj.1", inp)
                keys |= {f"{p}.branch_proj.2.weight": (inp, inp, 1, 1)} | _bn(f"{p}.branch_proj.3", inp)
            cin, i = cout, i + 1
    keys |= {f"{m}conv_last.0.weight": (last, cin, 1, 1)} | _bn(f"{m}conv_last.1", last)
    return keys | {f"{m}classifier.0.weight": (1000, last)}  # no bias


LAYOUTS = {"mmcls_shufflenet_v2_x1_0": mmcls_v2_layout, "mmcls_shufflenet_v1_x1_0_g3": mmcls_v1_layout,
           **{arch: (lambda s=size: megvii_layout(s)) for arch, size in MEGVII_SIZES.items()}}


def _expand(spec: str) -> dict[str, tuple[int, ...]]:
    """Lines 'key d0,d1,...' or 'prefix bn C' (a BatchNorm's five entries) -> {key: shape}."""
    out: dict[str, tuple[int, ...]] = {}
    for line in spec.strip().splitlines():
        key, *rest = line.split()
        if rest[0] == "bn":
            out |= _bn(key, int(rest[1]))
        else:
            out[key] = tuple(int(d) for d in rest[0].split(",")) if rest[0] != "()" else ()
    return out


# One block and the head of each source, spelled out.
MMCLS_V2_BLOCK_AND_HEAD = _expand("""
backbone.layers.1.3.branch2.0.conv.weight 116,116,1,1
backbone.layers.1.3.branch2.0.bn bn 116
backbone.layers.1.3.branch2.1.conv.weight 116,1,3,3
backbone.layers.1.3.branch2.1.bn bn 116
backbone.layers.1.3.branch2.2.conv.weight 116,116,1,1
backbone.layers.1.3.branch2.2.bn bn 116
backbone.layers.3.conv.weight 1024,464,1,1
backbone.layers.3.bn bn 1024
head.fc.weight 1000,1024
head.fc.bias 1000
""")
MMCLS_V1_BLOCK_AND_HEAD = _expand("""
backbone.layers.0.0.g_conv_1x1_compress.conv.weight 60,24,1,1
backbone.layers.0.0.g_conv_1x1_compress.bn bn 60
backbone.layers.0.0.depthwise_conv3x3_bn.conv.weight 60,1,3,3
backbone.layers.0.0.depthwise_conv3x3_bn.bn bn 60
backbone.layers.0.0.g_conv_1x1_expand.conv.weight 216,20,1,1
backbone.layers.0.0.g_conv_1x1_expand.bn bn 216
backbone.layers.1.1.g_conv_1x1_compress.conv.weight 120,160,1,1
head.fc.weight 1000,960
head.fc.bias 1000
""")
MEGVII_X1_0_BLOCK_AND_HEAD = _expand("""
module.features.0.branch_main.0.weight 58,24,1,1
module.features.0.branch_main.1 bn 58
module.features.0.branch_main.3.weight 58,1,3,3
module.features.0.branch_main.4 bn 58
module.features.0.branch_main.5.weight 92,58,1,1
module.features.0.branch_main.6 bn 92
module.features.0.branch_proj.0.weight 24,1,3,3
module.features.0.branch_proj.1 bn 24
module.features.0.branch_proj.2.weight 24,24,1,1
module.features.0.branch_proj.3 bn 24
module.features.1.branch_main.0.weight 58,58,1,1
module.conv_last.0.weight 1024,464,1,1
module.classifier.0.weight 1000,1024
""")


def test_layouts_spelled_out():
    for layout, explicit in ((mmcls_v2_layout(), MMCLS_V2_BLOCK_AND_HEAD), (mmcls_v1_layout(), MMCLS_V1_BLOCK_AND_HEAD),
                             (megvii_layout("1.0x"), MEGVII_X1_0_BLOCK_AND_HEAD)):
        assert {k: layout.get(k) for k in explicit} == explicit
    megvii = megvii_layout("1.0x")
    assert "module.classifier.0.bias" not in megvii and "module.features.1.branch_proj.0.weight" not in megvii
    assert megvii_layout("2.0x")["module.classifier.0.weight"] == (1000, 2048)


def _random_tensors(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1234)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", "bias")):
            out[key] = (torch.rand(shape, generator=g) - 0.5) * 0.2
        elif len(shape) == 1:  # BN weight
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:  # conv / linear weight: He-scaled so activations neither vanish nor explode
            out[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
    return out


def _save_source_checkpoint(arch: str, tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    if arch.startswith("mmcls"):
        path = folder / f"{arch}_20200812-00000000.pth"
        meta = {"mmcv_version": "1.3.9", "time": "Wed Aug 12 2020", "epoch": 300, "iter": 375300,
                "CLASSES": ["tench", "goldfish"], "config": "model = dict(type='ImageClassifier')"}
        torch.save({"meta": meta, "state_dict": tensors}, path)
    else:
        path = folder / f"ShuffleNetV2.{MEGVII_SIZES[arch]}.pth.tar"
        torch.save({"state_dict": tensors}, path)
    return path


def _source_to_ours(arch: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in tensors.items()} if arch.startswith("megvii") else tensors


def _x(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# --- zoo entries: config, registry, sizes ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ALL)
def test_zoo_yaml(arch):
    entry = OmegaConf.to_object(model_entry(arch))  # conf/model/ARCH.yaml with its preprocessing block
    top1, top5, ops, kind, params = TABLE[arch]
    assert entry.name == entry.arch == arch and arch in available_archs()
    ref = entry.reference
    assert (ref.top1, ref.top5, ref.flops_m, ref.flops_kind, ref.params_m) == (top1, top5, ops, kind, params)
    pre = entry.preprocess
    if arch.startswith("mmcls"):
        assert entry.source == "mmcls" and entry.weights_url == MMCLS_WEIGHTS[arch]
        assert entry.weights_url == get_arch(arch).default_weights()
        # imagenet_bs64_pil_resize: Pillow resize, mean/std in 0..255 units on RGB
        assert (pre.backend, pre.color, pre.scale, pre.mean) == ("pillow", "rgb", 1.0, [123.675, 116.28, 103.53])
    else:
        assert entry.source == "megvii" and entry.weights_url is None and entry.checkpoint is None
        # ShuffleNetV2/train.py: OpencvResize(256), CenterCrop(224), ToBGRTensor (BGR 0..255, nothing subtracted)
        assert (pre.backend, pre.color, pre.scale, pre.mean, pre.std) == ("opencv", "bgr", 1.0, [0.0] * 3, [1.0] * 3)


@pytest.mark.parametrize("arch", ALL)
def test_builds_and_matches_published_size(arch):
    model = build_model(arch, pretrained=False)
    with torch.inference_mode():
        out = model(_x(1))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    published = TABLE[arch][4]
    # 1%, except where the table's rounding is coarser: Megvii's 0.5x is "1.4" M for 1.366 M.
    tolerance = max(0.01 * published, 0.05 if arch == "megvii_shufflenet_v2_x0_5" else 0.0)
    assert abs(params - published) <= tolerance, f"{arch}: {params:.3f} M parameters vs {published} M"
    # And the state dict is exactly the source's layout (keys and shapes).
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _source_to_ours(arch, LAYOUTS[arch]())


def _macs(model: torch.nn.Module) -> float:
    total = 0

    def hook(m, _inputs, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.inference_mode():
        model(torch.zeros(1, 3, 224, 224))
    for h in handles:
        h.remove()
    return total / 1e6


@pytest.mark.parametrize("arch", list(MEGVII_SIZES))
def test_megvii_macs_match_published_flops(arch):
    assert _macs(build_model(arch, pretrained=False)) == pytest.approx(TABLE[arch][2], rel=0.015)


# --- checkpoints in the sources' layouts ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ALL)
def test_source_checkpoint_loads_strictly(tmp_path, arch):
    tensors = _random_tensors(LAYOUTS[arch](), seed=7)
    path = _save_source_checkpoint(arch, tensors, tmp_path)
    loaded = build_model(arch, pretrained=True, checkpoint=str(path))  # the checkpoint wins over pretrained
    reference = get_arch(arch).builder(num_classes=1000).eval()
    reference.load_state_dict(_source_to_ours(arch, tensors), strict=True)
    x = _x(2)
    with torch.inference_mode():
        got, want = loaded(x), reference(x)
    assert torch.equal(got, want) and got.abs().max() > 1e-2  # not a vanishing signal


@pytest.mark.parametrize("arch", ["mmcls_shufflenet_v2_x1_0", "megvii_shufflenet_v2_x1_0"])
def test_wrong_keys_are_named(tmp_path, arch):
    tensors = _random_tensors(LAYOUTS[arch](), seed=3)
    head = "head.fc.weight" if arch.startswith("mmcls") else "module.classifier.0.weight"
    tensors[head.replace("weight", "kernel")] = tensors.pop(head)
    path = _save_source_checkpoint(arch, tensors, tmp_path)
    with pytest.raises(ModelError) as info:
        build_model(arch, pretrained=False, checkpoint=str(path))
    msg = str(info.value)
    ours = head.removeprefix("module.")
    assert "1 missing key" in msg and ours in msg and "1 unexpected key" in msg and "kernel" in msg
    assert arch in msg and "\n" not in msg


def test_torchvision_checkpoint_is_not_megvii(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(torchvision.models.shufflenet_v2_x1_0(weights=None).state_dict(), path)
    with pytest.raises(ModelError, match=r"missing keys \(first_conv\.0\.weight.*unexpected keys \(conv1\.0\.weight"):
        build_model("megvii_shufflenet_v2_x1_0", pretrained=False, checkpoint=str(path))


def test_megvii_checkpoint_without_module_prefix_loads(tmp_path):
    tensors = _source_to_ours("megvii_shufflenet_v2_x0_5", _random_tensors(megvii_layout("0.5x"), seed=5))
    path = tmp_path / "plain.pth"
    torch.save(tensors, path)
    model = build_model("megvii_shufflenet_v2_x0_5", pretrained=False, checkpoint=str(path))
    assert torch.equal(model.state_dict()["classifier.0.weight"], tensors["classifier.0.weight"])


def test_megvii_pretrained_without_checkpoint_says_where_to_download():
    with pytest.raises(ModelError) as info:
        build_model("megvii_shufflenet_v2_x1_0", pretrained=True)
    msg = str(info.value)
    assert "1drv.ms" in msg and "model.checkpoint=PATH" in msg and "\n" not in msg


def test_mmcls_default_url_with_hash_check(monkeypatch):
    tensors = _random_tensors(mmcls_v1_layout(), seed=9)
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs.get("check_hash"), kwargs.get("weights_only")))
        return {"meta": {"epoch": 300}, "state_dict": tensors}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = build_model("mmcls_shufflenet_v1_x1_0_g3", pretrained=True)
    assert calls == [(MMCLS_WEIGHTS["mmcls_shufflenet_v1_x1_0_g3"], True, True)]
    assert torch.equal(model.state_dict()["head.fc.bias"], tensors["head.fc.bias"])


# --- behaviour against independent references -----------------------------------------------------------------

def _torchvision_key_to_mmcls(key: str) -> str:
    """mmcls ships a converter for exactly this: the networks are the same, only the names differ."""
    parts = key.split(".")
    if parts[0] in ("conv1", "conv5"):
        module = "backbone.conv1" if parts[0] == "conv1" else "backbone.layers.3"
        return f"{module}.{'conv' if parts[1] == '0' else 'bn'}.{'.'.join(parts[2:])}"
    if parts[0] == "fc":
        return "head." + key
    stage, block, branch, index, *rest = parts
    position = {"branch1": ["0.conv", "0.bn", "1.conv", "1.bn"],
                "branch2": ["0.conv", "0.bn", None, "1.conv", "1.bn", "2.conv", "2.bn"]}[branch][int(index)]
    return f"backbone.layers.{int(stage[-1]) - 2}.{block}.{branch}.{position}.{'.'.join(rest)}"


def test_mmcls_v2_computes_torchvision_shufflenet_v2(tmp_path):
    tv = torchvision.models.shufflenet_v2_x1_0(weights=None).eval()
    tensors = _random_tensors({k: tuple(v.shape) for k, v in tv.state_dict().items()}, seed=11)
    tv.load_state_dict(tensors)
    path = _save_source_checkpoint("mmcls_shufflenet_v2_x1_0",
                                   {_torchvision_key_to_mmcls(k): v for k, v in tensors.items()}, tmp_path)
    model = build_model("mmcls_shufflenet_v2_x1_0", pretrained=False, checkpoint=str(path))
    x = _x(2)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), tv(x), rtol=1e-5, atol=1e-5)


def _megvii_reference(sd: dict[str, torch.Tensor], bgr255: torch.Tensor) -> torch.Tensor:
    """Megvii's forward, written out functionally from network.py/blocks.py, on BGR 0..255 input."""
    def conv_bn(x, conv, bn, stride=1, relu=True):
        w = sd[f"module.{conv}.weight"]
        groups = x.shape[1] if w.shape[1] == 1 and x.shape[1] > 1 else 1
        x = F.conv2d(x, w, None, stride, w.shape[-1] // 2, 1, groups)
        x = F.batch_norm(x, sd[f"module.{bn}.running_mean"], sd[f"module.{bn}.running_var"],
                         sd[f"module.{bn}.weight"], sd[f"module.{bn}.bias"], False, 0.0, 1e-5)
        return F.relu(x) if relu else x

    x = F.max_pool2d(conv_bn(bgr255, "first_conv.0", "first_conv.1", 2), 3, 2, 1)
    for i in range(16):
        p = f"features.{i}"
        if f"module.{p}.branch_proj.0.weight" in sd:
            proj = conv_bn(conv_bn(x, f"{p}.branch_proj.0", f"{p}.branch_proj.1", 2, relu=False),
                           f"{p}.branch_proj.2", f"{p}.branch_proj.3")
            main, stride = x, 2
        else:  # channel pairs (2j, 2j+1): the first of each pair passes through, the second enters the branch
            n, c, h, w = x.shape
            pairs = x.reshape(n, c // 2, 2, h, w)
            proj, main, stride = pairs[:, :, 0], pairs[:, :, 1], 1
        main = conv_bn(main, f"{p}.branch_main.0", f"{p}.branch_main.1")
        main = conv_bn(main, f"{p}.branch_main.3", f"{p}.branch_main.4", stride, relu=False)
        main = conv_bn(main, f"{p}.branch_main.5", f"{p}.branch_main.6")
        x = torch.cat((proj, main), 1)
    x = F.avg_pool2d(conv_bn(x, "conv_last.0", "conv_last.1"), 7).flatten(1)
    return x @ sd["module.classifier.0.weight"].T


@pytest.mark.parametrize("arch", ["megvii_shufflenet_v2_x0_5", "megvii_shufflenet_v2_x2_0"])
def test_megvii_matches_reference_on_bgr_pixels(tmp_path, arch):
    """The network takes Megvii's own input, BGR 0..255, straight from the entry's preprocessing: no adapter."""
    tensors = _random_tensors(LAYOUTS[arch](), seed=13)
    tensors["module.first_conv.0.weight"] /= 100.0  # the real stem is scaled for 0..255 input
    model = build_model(arch, pretrained=False, checkpoint=str(_save_source_checkpoint(arch, tensors, tmp_path)))
    assert next(iter(model.state_dict())) == "first_conv.0.weight"  # the first thing the input meets
    crops = np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)  # RGB
    bgr255 = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1].transpose(0, 3, 1, 2))).float()
    fed = torch.from_numpy(normalize_batch(crops, Preprocess.from_config(model_entry(arch).preprocess)))
    assert torch.equal(fed, bgr255)  # the pipeline feeds exactly Megvii's ToBGRTensor output
    with torch.inference_mode():
        got = model(fed)
        want = _megvii_reference(tensors, bgr255)
    assert got.abs().max() > 1e-1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# --- ONNX ----------------------------------------------------------------------------------------------------

def _photos(arch: str, n: int = 4) -> torch.Tensor:
    """Real photos preprocessed as ``arch``'s entry says (Megvii: BGR 0..255)."""
    p = Preprocess.from_config(model_entry(arch).preprocess)
    files = sorted(SAMPLE.glob("*/*.JPEG"))[:n]
    return torch.from_numpy(np.stack([preprocess(load_rgb(f), p) for f in files]))


def _lively(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Random weights whose logits are O(1) rather than build_model's near-zero init: He-initialised convs and
    BatchNorm statistics measured on ``x``, so a 1e-4 tolerance means something."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    model.train()
    with torch.no_grad():
        model(x)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="../shared/data/imagenet/sample is absent")
@pytest.mark.parametrize("arch", ALL)
def test_onnx_export_matches_torch_on_photos(tmp_path, arch):
    import onnx
    import onnxruntime as ort

    photos = _photos(arch)
    assert len(photos) == 4
    model = _lively(build_model(arch, pretrained=False), photos)
    path = tmp_path / f"{arch}.onnx"
    torch.onnx.export(model, photos[:2], str(path), opset_version=11, dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": photos.numpy()})[0]  # batch 4 through a graph traced at 2
    with torch.inference_mode():
        want = model(photos).numpy()
    assert got.shape == (4, 1000) and np.abs(want).max() > 0.5
    assert np.abs(got - want).max() < 1e-4
