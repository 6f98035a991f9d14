"""Values that cannot mean anything fail at start-up, in one line naming the key, before any work is done.

The structured configs (``quantize.config``) already refuse a misspelt key, a value of the wrong type and an unknown
choice (method, format, type); these checks refuse well-typed values no run can honour: a count of zero or below, a
batch of no images, a negative seed, an empty stage list, a percentile outside (0, 100], a histogram too small to
read a range from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig

from quantize.config import Config
from quantize.core.errors import ConfigError
from quantize.stages.histogram import MIN_BINS


def _at_least(minimum: int, what: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value >= minimum else f"must be at least {minimum} ({what})"
    return check


def _optional(check: Callable[[Any], str | None], none_means: str) -> Callable[[Any], str | None]:
    def optional(value: Any) -> str | None:
        problem = check(value) if value is not None else None
        return f"{problem}, or null for {none_means}" if problem else None
    return optional


def _percentile(value: float) -> str | None:
    return None if 0 < value <= 100 else "must be in (0, 100] (the share of values the range covers, in percent)"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


_SEED = _at_least(0, "a seed of the class-balanced selection")

RULES: dict[str, Callable[[Any], str | None]] = {
    "calib.num_images": _at_least(1, "calibration images"),
    "calib.batch_size": _at_least(1, "images per calibration batch"),
    "calib.num_bins": _at_least(MIN_BINS, "histogram bins per tensor"),
    "calib.percentile": _percentile,
    "calib.seed": _SEED,
    "eval.limit": _optional(_at_least(1, "evaluation images"), "every image"),
    "eval.batch_size": _at_least(1, "images per evaluation batch"),
    "eval.seed": _SEED,
    "export.check_images": _at_least(1, "images the exported model is checked on"),
    "export.tolerance": _positive,
    "data.workers": _at_least(1, "decoding threads"),
    "threads": _at_least(0, "ONNX Runtime threads; 0 for every core"),
    "model.num_classes": _at_least(1, "classes the model predicts"),
    "quant.refine_images": _optional(_at_least(1, "images weight rounding reads"), "every calibration image"),
    "quant.bias_correction_images": _at_least(1, "images bias correction reads"),
    "quant.batch_size": _at_least(1, "images per batch of equalize, GPTQ and bias correction"),
    "quant.max_trials": _at_least(1, "trials the accuracy budget may spend"),
    "quant.tune_images": _at_least(1, "images the accuracy budget tunes on"),
    "quant.tune_batch_size": _at_least(1, "images per batch when the budget scores a trial"),
    "analysis.sensitivity_images": _at_least(1, "images the sensitivity analysis reads"),
    "analysis.sensitivity_top": _at_least(1, "rows of the sensitivity table"),
    "analysis.sensitivity_batch_size": _at_least(1, "images per sensitivity batch"),
    "analysis.speed_batch_size": _at_least(1, "images per timed run"),
    "analysis.speed_runs": _at_least(1, "timed runs per model"),
}

_MISSING = object()


def _value(cfg: Any, key: str) -> Any:
    """``cfg.a.b`` for key ``a.b`` (a Config dataclass or a DictConfig); _MISSING when the config has no such key."""
    for part in key.split("."):
        try:
            cfg = getattr(cfg, part)
        except (AttributeError, KeyError, Exception):  # omegaconf raises its own errors for absent keys
            return _MISSING
    return cfg


def _shown(value: Any) -> str:
    if isinstance(value, (ListConfig, list)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return "null" if value is None else str(value)


_DEFAULTS = Config()


def check_config(cfg: Config | DictConfig) -> None:
    """Raise ConfigError, one line naming the first offending key and value, for a value no run can honour."""
    if not len(cfg.stages):
        raise ConfigError("stages=[] names no stage, so the run would do nothing; list the stages to compute, "
                          "e.g. stages=[evaluate,report], or leave stages out for all of them")
    for key, rule in RULES.items():
        value = _value(cfg, key)
        if value is _MISSING:
            continue
        problem = rule(value)
        if problem:
            default = _value(_DEFAULTS, key)
            hint = f"the default is {key}={_shown(default)}" if default is not _MISSING and rule(default) is None \
                else f"set {key}=..."
            raise ConfigError(f"{key}={_shown(value)} {problem}; {hint}")
