"""Inference runtimes behind one interface: load an ONNX classifier, run a batch, say which runtime and version.

The int8 QDQ model is an interchange format: users deploy it on ONNX Runtime or on OpenVINO, and its accuracy and
speed are what they get *in that runtime*. The evaluate stage and the latency benchmark take a runtime by name
(``eval.runtime``, ``--runtimes``) and see only this interface:

    runtime = get_runtime("openvino")        # ConfigError with the install command when it is not installed
    model = runtime.load("model.int8.onnx", threads=1)
    logits = model.run(images)               # float32 NCHW batch -> first output, (batch, classes)
    runtime.name, runtime.version            # recorded beside every figure; the version keys cached predictions

ONNX Runtime is a dependency. OpenVINO is the optional extra ``pip install 'quantize[openvino]'``; it reads the
ONNX files directly (no conversion step). It is configured to compute what the file says:

- ``INFERENCE_PRECISION_HINT=f32``: on CPUs with bfloat16 units (AVX512-BF16/AMX, like this project's) OpenVINO
  otherwise runs the fp32 model in bfloat16, which changed 3 and 4 of 200 top-1 predictions on the two real-weights
  canaries; the int8 model's integer kernels are the same either way;
- one stream, ``threads`` inference threads, no CPU pinning (other jobs share the cores);
- static shapes: the model is compiled for the batch size given to ``load`` (compiling takes 0.5-0.7 s, so it is
  done there, outside any timing); a smaller batch is padded to it, a larger one is compiled for on first use.
  OpenVINO's CPU plugin runs a static shape faster: 7.6 against 11.3 ms for int8 EfficientNet-Lite0 at batch 1,
  measured interleaved on 2 busy cores.

A loaded model belongs to one thread at a time; the evaluate stage gives each worker thread its own.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np

from quantize.core.errors import ConfigError, ModelError
from quantize.core.runtime import input_name, make_session

DEFAULT = "onnxruntime"
RUNTIMES = ("onnxruntime", "openvino")
INSTALL = {"openvino": "pip install 'quantize[openvino]' (or make install EXTRAS=openvino)"}


class LoadedModel(Protocol):
    def run(self, images: np.ndarray) -> np.ndarray:
        """Logits (the first output) of a float32 NCHW batch."""


class Runtime:
    """One inference runtime: ``load`` gives a model whose ``run`` maps a batch to logits."""

    name: str = ""
    package: str = ""  # the distribution whose version is reported

    @property
    def version(self) -> str:
        return metadata.version(self.package)

    def key(self) -> dict[str, str]:
        """What identifies this runtime's numbers in a cache key: ``{name: version}``."""
        return {self.name: self.version}

    def load(self, path: str | Path, threads: int = 0, lean: bool = False, batch: int | None = None) -> LoadedModel:
        """The model at ``path`` on ``threads`` cores (0: every core). ``lean``: keep resident memory low where
        the runtime offers the choice, for long runs over many batches. ``batch``: the batch size it will mostly
        run, for runtimes that prepare a model per input shape."""
        raise NotImplementedError


class _OrtModel:
    def __init__(self, session) -> None:
        self.session = session
        self.feed = input_name(session)

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.feed: images})[0]


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    package = "onnxruntime"

    def load(self, path: str | Path, threads: int = 0, lean: bool = False, batch: int | None = None) -> LoadedModel:
        """A CPU session with every graph optimization (QDQ pairs fused into integer kernels), made by
        ``quantize.core.runtime.make_session``; ``lean`` turns off the memory pattern (see there). Any batch size
        runs in one session."""
        return _OrtModel(make_session(path, threads=threads, memory_pattern=not lean))


class _OpenVinoModel:
    def __init__(self, runtime: "OpenVino", path: Path, threads: int) -> None:
        self.runtime = runtime
        self.path = path
        self.threads = threads
        self.model = runtime.read(path)
        self.requests: dict[tuple[int, ...], object] = {}  # per input shape, batch first

    def prepare(self, batch: int, sample: tuple[int, ...] | None = None) -> None:
        """Compile for batches of ``batch`` images of shape ``sample`` (default: the model's own)."""
        if sample is None:
            dims = self.model.input(0).get_partial_shape()
            if dims.rank.is_dynamic or any(d.is_dynamic for d in list(dims)[1:]):
                return  # the image size is not in the file: compiled when the first batch shows it
            sample = tuple(d.get_length() for d in list(dims)[1:])
        shape = (batch, *sample)
        if shape in self.requests:
            return
        model = self.model.clone()
        try:
            model.reshape(list(shape))
        except Exception as exc:  # OpenVINO's own RuntimeError subclasses
            raise ModelError(f"OpenVINO cannot give {self.path} an input of shape {list(shape)}: "
                             f"{str(exc).splitlines()[0]}") from exc
        self.requests[shape] = self.runtime.compile(model, self.threads, self.path).create_infer_request()

    def run(self, images: np.ndarray) -> np.ndarray:
        count, sample = len(images), tuple(images.shape[1:])
        batch = min((b for b, *rest in self.requests if tuple(rest) == sample and b >= count), default=None)
        if batch is None:  # nothing compiled this large: compile for exactly this batch
            batch = count
            self.prepare(batch, sample)
        if batch > count:  # a short batch (the last one) runs padded rather than compiling once more
            images = np.concatenate([images, np.zeros((batch - count, *sample), dtype=images.dtype)])
        result = self.requests[(batch, *sample)].infer({0: images})
        return np.array(result[0][:count], copy=True)  # the request's output buffer is reused by the next run


class OpenVino(Runtime):
    name = "openvino"
    package = "openvino"
    precision = "f32"  # INFERENCE_PRECISION_HINT: what the fp32 model's floating-point layers compute in

    def key(self) -> dict[str, str]:
        return {self.name: self.version, "openvino_precision": self.precision}

    def __init__(self) -> None:
        try:
            import openvino
        except ImportError:
            raise ConfigError(f"OpenVINO is not installed; install it with {INSTALL['openvino']}") from None
        self.ov = openvino
        self.core = openvino.Core()

    def read(self, path: Path):
        try:
            return self.core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ModelError(f"OpenVINO cannot read {path}: {str(exc).splitlines()[0]}") from exc

    def compile(self, model, threads: int, path: Path):
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            return self.core.compile_model(model, "CPU", config)
        except Exception as exc:
            raise ModelError(f"OpenVINO cannot compile {path}: {str(exc).splitlines()[0]}") from exc

    def load(self, path: str | Path, threads: int = 0, lean: bool = False, batch: int | None = None) -> LoadedModel:
        """``threads=0``: OpenVINO's default (every core); ``lean`` changes nothing (memory is planned per shape).
        With ``batch`` the model is compiled for it now."""
        model = _OpenVinoModel(self, Path(path), threads)
        if batch:
            model.prepare(batch)
        return model


_RUNTIMES = {"onnxruntime": OnnxRuntime, "openvino": OpenVino}
_made: dict[str, Runtime] = {}


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name`` (one of RUNTIMES); ConfigError naming the install command when it is missing."""
    name = str(name)  # config.Runtime choices print as their value
    if name not in _RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}; runtimes are {', '.join(RUNTIMES)}")
    if name not in _made:
        _made[name] = _RUNTIMES[name]()
    return _made[name]


def available(name: str) -> bool:
    """Whether runtime ``name`` can be used here (its package is installed)."""
    try:
        get_runtime(name)
    except ConfigError:
        return False
    return True
