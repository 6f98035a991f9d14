"""Structured configs: the schema behind conf/. A misspelt or mistyped key fails when Hydra composes the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from quantize.core.errors import ConfigError

# What a run does by default; each must be listed in stages= (or be cached) to run.
STAGES = ["export", "calibrate", "quantize", "evaluate", "report"]
# Every stage that can be named in stages=, in the order they run. The ones not in STAGES run when the config
# asks for them (quant.equalize, quant.weight_rounding, ...) or when named.
ALL_STAGES = ["export", "equalize", "balance", "optimize", "calibrate", "quantize", "refine", "budget", "evaluate",
              "sensitivity", "speed", "report"]


class Choice(str, Enum):
    """A config choice: compared, hashed and written to JSON as its string value."""

    def __str__(self) -> str:
        return self.value


class Runtime(Choice):
    onnxruntime = "onnxruntime"
    openvino = "openvino"   # the optional extra: pip install 'quantize[openvino]'


class CalibMethod(Choice):
    percentile = "percentile"
    minmax = "minmax"
    entropy = "entropy"
    mse = "mse"          # the range with the least 8-bit quantization error of each tensor (histogram.mse_range)


class QuantFormat(Choice):
    qdq = "qdq"
    qoperator = "qoperator"


class QuantType(Choice):
    uint8 = "uint8"
    int8 = "int8"


class WeightRounding(Choice):
    nearest = "nearest"
    gptq = "gptq"


class WeightScales(Choice):
    max = "max"          # max|w| / 127 per channel (ONNX Runtime's choice)
    search = "search"    # the scale with the least rounding error per channel (accuracy/weight_scales.py)


class ParamsKind(Choice):
    trainable = "trainable"
    paddle = "paddle"   # also counts BatchNorm running statistics


class FlopsKind(Choice):
    macs = "macs"
    flops = "flops"
    paddle_flops = "paddle_flops"


C = TypeVar("C", bound=Choice)


def choice(kind: type[C], value: object, option: str) -> C:
    """``value`` as a member of ``kind``, or a one-line ConfigError naming the option and the allowed values (for
    callers of the stage functions that bypass the structured config)."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{option}={value!r} is not one of {', '.join(m.value for m in kind)}") from None


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class ReferenceConfig:
    """Published fp32 accuracy of the weights (percent), printed beside ours in the report."""
    top1: Optional[float] = None
    top5: Optional[float] = None
    source: str = ""
    params_m: Optional[float] = None   # published parameter count, millions, counted as params_kind says
    params_kind: ParamsKind = ParamsKind.trainable
    flops_m: Optional[float] = None    # published compute, millions, counted as flops_kind says
    flops_kind: FlopsKind = FlopsKind.macs  # which convention the source uses


@dataclass
class PreprocessConfig:
    """A model's eval transform (quantize.data.preprocess.Preprocess checks it at start-up: choices, sizes, lengths).
    Each zoo entry selects its source's block from conf/model/preprocess/; every key can be overridden."""
    resize: int = 256              # shorter side after resizing, pixels
    crop: int = 224                # center crop, pixels
    interpolation: str = "bilinear"  # nearest | bilinear | bicubic | lanczos | box, hamming (pillow) | area (opencv)
    backend: str = "pillow"        # pillow (antialiased, as torchvision) | opencv (cv2.resize, no antialiasing)
    resize_rounding: str = "floor"  # longer side = resize * long / short: floor | round (half to even) | half_up
    crop_rounding: str = "round"   # crop offset = (side - crop) / 2: round (half to even) | floor | half_up
    color: str = "rgb"             # rgb | bgr: channel order the network takes
    scale: float = 1 / 255         # pixel (0..255) multiplier applied before mean/std
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # network channel order, scaled units
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class ModelConfig:
    name: str = MISSING            # zoo entry name: names artifacts and reports
    arch: str = MISSING            # builder in quantize.models
    source: str = ""               # who publishes the weights (torchvision, mmcls, ...)
    pretrained: bool = True        # false: random init (reproducible)
    weights_url: Optional[str] = None
    checkpoint: Optional[str] = None  # local weights file; wins over weights_url
    path: Optional[str] = None     # arch=onnx: the user's ONNX classifier (export is skipped)
    num_classes: int = 1000
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # how its weights expect images


@dataclass
class DataConfig:
    root: Optional[str] = None     # ImageNet val: synset folders, or flat images plus a labels file
    labels: Optional[str] = None   # labels file for the flat layout (default: looked up in root)
    synsets: Optional[str] = None  # the 1000 sorted synsets (default: bundled list)
    workers: int = 2               # decoding threads
    cache_dir: Optional[str] = None  # preprocessed crops (python -m data_prep cache), used when one matches


@dataclass
class ExportConfig:
    opset: int = 11
    check_images: int = 8          # real images whose ORT and PyTorch logits are compared
    tolerance: float = 1e-3        # max abs logit difference accepted


@dataclass
class CalibConfig:
    method: CalibMethod = CalibMethod.percentile
    percentile: float = 99.999
    num_bins: int = 2048
    num_images: int = 1000         # class-balanced: one image per class first
    # Committed image list used when the calibration folder holds ImageNet val (null: select from the folder).
    # A relative path is looked up from the current directory, then from the project root.
    list: Optional[str] = "calib_lists/ilsvrc2012_val_1000.txt"
    seed: int = 0
    batch_size: int = 8            # activations of one batch are the calibration's whole memory
    root: Optional[str] = None     # default: data.root
    labels: Optional[str] = None   # default: data.labels


@dataclass
class QuantConfig:
    format: QuantFormat = QuantFormat.qdq
    activation_type: QuantType = QuantType.uint8
    weight_type: QuantType = QuantType.int8
    per_channel: bool = True
    reduce_range: bool = False
    opset: Optional[int] = None    # int8 model opset; default: the fp32 opset, raised to 13 for per-channel QDQ
    op_types: Optional[List[str]] = None  # default: every op type ONNX Runtime can quantize
    nodes_to_exclude: List[str] = field(default_factory=list)
    # Post-training methods beyond ONNX Runtime's quantizer, each off in this schema (and so in the Python API's
    # QuantConfig()); the CLI's default preset, conf/quant/u8s8_fidelity.yaml, turns on balance,
    # shared_concat_ranges, weight_scales=search and weight_rounding=gptq. Measured effects: README ("The default
    # recipe") and quantize/accuracy/{equalize,range_balance,shared_ranges,weight_scales,weight_rounding,bias_correction}.py.
    equalize: bool = False         # rescale channels between convolutions (exact through ReLU/ReLU6) before calibration
    balance: bool = False          # rescale |x| channel peaks of Conv->[Relu]->[MaxPool]->Conv tensors (range_balance.py)
    balance_strength: float = 1.0  # s_c = (max peak / peak_c) ** strength
    balance_images: Optional[int] = 256  # calibration images range balancing reads (null: all)
    shared_concat_ranges: bool = False  # a Concat's inputs and output quantized on one range (shared_ranges.py)
    # the int8 model quantizes 8-bit pixels, exact at scale 1 (graph/pixel_input.py): ShuffleNetV2 x1.0 agreement
    # +0.5 points for 5-10% of int8 speed, so off in every preset (README, "Accuracy beyond the default"); the stem
    # then reads the pixel mapping, not the input, so float_stem leaves it in int8
    pixel_input: bool = False
    # a stem convolution followed by a MaxPool stays in fp32 with its activation and pool, padded to 16-channel
    # blocks (static_quant, graph/stem_channels.pooled_stem): the input and the stem's output are not quantized
    float_stem: bool = False
    weight_scales: WeightScales = WeightScales.max  # search: per-channel scales of least rounding error
    weight_rounding: WeightRounding = WeightRounding.nearest  # gptq: int8 weights minimizing each layer's output error
    bias_correction: bool = False  # int32 biases moved so each Conv/Gemm's mean output per channel matches fp32
    refine_images: Optional[int] = None  # calibration images GPTQ reads (streamed; default: all of them)
    bias_correction_images: int = 200  # calibration images bias correction reads (held in memory: ~15 MiB each)
    batch_size: int = 8            # images per batch for equalize, GPTQ and bias correction
    # Accuracy budget: keep the nodes that hurt most in fp32 until int8 loses at most max_drop top-1 points on a
    # tuning subset of the calibration images (left out of the final evaluation). null: no budget.
    max_drop: Optional[float] = None
    max_trials: int = 8            # quantize + evaluate trials the budget may spend
    tune_images: int = 100         # size of the tuning subset (class-balanced, from the calibration images)
    tune_batch_size: int = 32      # images per batch when the budget scores a trial


@dataclass
class EvalConfig:
    root: Optional[str] = None     # default: data.root
    labels: Optional[str] = None   # default: data.labels
    limit: Optional[int] = None    # deterministic class-balanced subset of this many images
    seed: int = 0
    batch_size: int = 32
    runtime: Runtime = Runtime.onnxruntime  # the runtime fp32 and int8 are evaluated in (quantize.core.inference)


@dataclass
class AnalysisConfig:
    sensitivity: bool = False      # per-node SQNR of int8 vs fp32, ranked, with a plot
    sensitivity_images: int = 32   # calibration images it runs on
    sensitivity_top: int = 15      # rows in report.md (report.json has every tensor)
    sensitivity_batch_size: int = 8
    speed: bool = False            # int8 / fp32 latency ratio, a cached stage
    speed_batch_size: int = 1
    speed_runs: int = 100          # timed runs per model (alternating blocks); speedup: ratio of medians


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    stages: List[str] = field(default_factory=lambda: list(STAGES))  # any of ALL_STAGES
    work_dir: str = "artifacts"    # stage artifacts, reused across runs: <work_dir>/<model.name>/<stage>-<key>/
    threads: int = 0               # ONNX Runtime intra-op threads (0: all cores)


def _torchvision_preprocess(name: str, key: str) -> Any:
    """``${torchvision_preprocess:NAME,KEY}``: one setting of torchvision's eval transform for NAME's default weights
    (their ``transforms()``), so ``+model=torchvision model.name=NAME`` is fed as torchvision evaluated it."""
    from quantize.models.torchvision_models import weights_preprocess  # imports torchvision: only when used

    return weights_preprocess(str(name))[key]


def register_configs() -> None:
    if not OmegaConf.has_resolver("stem"):
        OmegaConf.register_new_resolver("stem", lambda path: Path(str(path)).stem if path else "")
    if not OmegaConf.has_resolver("torchvision_preprocess"):
        OmegaConf.register_new_resolver("torchvision_preprocess", _torchvision_preprocess)
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config ``python -m quantize OVERRIDES`` runs with, composed outside a Hydra app (release jobs, benchmarks,
    ``data_prep``, tests)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def model_entry(name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Zoo entry ``name`` (conf/model/NAME.yaml with the preprocessing block it selects), as the pipeline sees it;
    an unknown name is a one-line ConfigError."""
    if not (CONF_DIR / "model" / f"{name}.yaml").is_file():
        from quantize.core.errors import ConfigError

        names = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"unknown model {name}; available models: {', '.join(names)}")
    entry = compose([f"+model={name}", *overrides]).model
    try:
        OmegaConf.to_container(entry.preprocess, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:  # +model=torchvision without model.name, +model=onnx without model.path
        from quantize.core.errors import ConfigError

        raise ConfigError(f"model {name}: {str(exc).splitlines()[0]} (it needs more settings than its name)") from None
    return entry
