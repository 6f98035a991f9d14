"""Command line: ``python -m quantize +model=NAME [key=value ...]`` (Hydra)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from quantize.config import register_configs
from quantize.core.errors import QuantizeError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def available_models() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def check_model_choice(argv: list[str]) -> str | None:
    """One line for a missing or unknown ``+model=``, before Hydra prints a multi-line error. None when fine."""
    if any(a in ("-h", "--help", "--hydra-help", "--info", "-i", "--shell-completion", "-sc") for a in argv):
        return None
    choices = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("model=")]
    names = available_models()
    if not choices:
        return f"choose a model with +model=NAME; available models: {', '.join(names)}"
    for choice in choices:
        unknown = [n for n in choice.split(",") if n not in names]
        if unknown:
            return f"unknown model {', '.join(unknown)}; available models: {', '.join(names)}"
    return None


register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def run(cfg: DictConfig) -> None:
    from quantize.api import run_pipeline  # heavy imports after Hydra has parsed the command line

    try:
        run_pipeline(cfg, HydraConfig.get().runtime.output_dir)
    except QuantizeError as exc:
        fail(str(exc))
    except OSError as exc:  # disk full, read-only or missing output folder: the environment, not a bug
        fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except KeyboardInterrupt:
        fail("interrupted; finished stages are kept, rerun the same command to resume", code=130)


def fail(message: str, code: int = 1) -> None:
    """End the run with one line on stderr (and the same line in the run's log file)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.makeLogRecord({"msg": f"error: {message}", "levelno": logging.ERROR,
                                                "levelname": "ERROR", "name": "quantize"}))
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    problem = check_model_choice(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    run()


if __name__ == "__main__":
    main()
