import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the clone; QUANTIZE_SHARED points elsewhere (a git worktree in another folder).
SHARED_IMAGENET = Path(os.environ.get("QUANTIZE_SHARED", REPO.parent / "shared")) / "data" / "imagenet"
SYNSETS = [line.split()[0] for line in (REPO / "quantize" / "resources" / "imagenet_synsets.txt").read_text().splitlines()]


def torchvision_metrics(name: str, weights: str = "IMAGENET1K_V1") -> dict[str, float]:
    """Published ImageNet-1k accuracy of a torchvision model's weights, read from torchvision itself (not from the
    YAML the code under test reads)."""
    import torchvision

    return torchvision.models.get_model_weights(name)[weights].meta["_metrics"]["ImageNet-1K"]


def compose_config(overrides):
    """The config ``python -m quantize`` would run with these command-line overrides."""
    from hydra import compose, initialize_config_dir

    from quantize.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def needs_shared_imagenet():
    return pytest.mark.skipif(not (SHARED_IMAGENET / "sample").is_dir(),
                              reason="../shared/data/imagenet is absent (fresh clone)")


def write_tiny_imagenet(root: Path, classes=(3, 250, 999), per_class=2, flat=False, seed=0) -> Path:
    """Random JPEGs of a few ImageNet classes, as synset folders or flat files plus val_label.txt."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    number = 0
    for label in classes:
        for _ in range(per_class):
            number += 1
            name = f"ILSVRC2012_val_{number:08d}.JPEG"
            size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            folder = root if flat else root / SYNSETS[label]
            folder.mkdir(exist_ok=True)
            Image.fromarray(pixels).save(folder / name, quality=90)
            lines.append(f"{name} {label}")
    if flat:
        (root / "val_label.txt").write_text("\n".join(lines) + "\n")
    return root
