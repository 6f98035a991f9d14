"""Command line: ``python -m quantize +model=NAME [key=value ...]`` (Hydra)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from quantize.config import register_configs
from quantize.core.errors import QuantizeError, one_line

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
        fail(_os_error(exc, cfg))
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


def _os_error(exc: OSError, cfg: DictConfig | None = None) -> str:
    """``Permission denied: /path; ...`` with the setting that chose the path, when it is one of ours."""
    if not exc.filename:
        return one_line(exc)
    message = f"{exc.strerror or exc}: {exc.filename}"
    work_dir = str(Path(cfg.work_dir).expanduser()) if cfg is not None and cfg.get("work_dir") else None
    if work_dir and str(exc.filename).startswith(work_dir):
        return f"{message}; set work_dir=PATH to a folder this user can write"
    return message + "; check that folder's permissions and free space"


def _hydra_error(exc: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages (override, key, type, full_key, ...) folded into one line."""
    skip = ("full_key:", "object_type", "reference_type", "See https://", "Set the environment variable")
    override = getattr(exc, "override", None)
    parts: list[str] = [f"cannot parse the override {override!r}"] if isinstance(override, str) else []
    for source in (exc, exc.__cause__):
        if source is None:
            continue
        for line in str(source).splitlines():
            line = line.strip()
            if line and not line.startswith(skip) and line not in parts:
                parts.append(line)
    text = "".join(p if i == 0 else (" " if parts[i - 1][-1] in ".:;" else ": ") + p for i, p in enumerate(parts))
    return one_line(text or type(exc).__name__, limit=600) + \
        " (python -m quantize --help lists the keys and groups)"


def main() -> None:
    problem = check_model_choice(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("HYDRA_FULL_ERROR"):  # asked for Hydra's own full tracebacks
        run()
        return
    # Hydra prints composition errors over several lines, and an unwritable run directory as a traceback: made to
    # raise instead, both end here as one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        run()
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: {_hydra_error(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # Hydra creating the run directory or its log file
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: cannot create the run directory ({exc.strerror or exc}{where}); set hydra.run.dir=PATH to a "
              "folder this user can write", file=sys.stderr)
        sys.exit(1)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    main()
