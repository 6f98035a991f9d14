"""README figure blocks: rendered from the committed artifacts, and the check that catches a drifted figure."""

import json
import shutil
from pathlib import Path

from quantize.bench import summary

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def test_readme_figures_match_their_artifacts():
    readme = (ROOT / "README.md").read_text()
    blocks = [m.group("name") for m in summary.BLOCK.finditer(readme)]
    assert {"networks", "ablations", "zoo"} <= set(blocks)
    _, changed = summary.refresh(readme, RESULTS)
    assert changed == [], f"README figure blocks out of date: {changed} (run make readme-figures)"


def test_a_changed_artifact_is_caught_and_rewritten(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    accuracy = results / "shufflenet_v2_x1_0" / "accuracy.json"
    data = json.loads(accuracy.read_text())
    data["all"]["agreement"] = 12.345
    accuracy.write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)

    assert summary.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert summary.main(["--results", str(results), "--readme", str(readme)]) == 0
    rewritten = readme.read_text()
    assert "12.35% ± " in rewritten and "12.35% ± " not in (ROOT / "README.md").read_text()
    assert summary.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    # text outside the blocks is left as it was
    outside = summary.BLOCK.sub("", rewritten)
    assert outside == summary.BLOCK.sub("", (ROOT / "README.md").read_text())


def test_every_block_names_its_artifacts():
    for name, render in summary.RENDERERS.items():
        body = render(RESULTS)
        assert "Artifacts: `benchmarks/results/" in body, name
        for path in summary.re.findall(r"`benchmarks/results/([^`]+)`", body):
            assert (RESULTS / path).is_file(), (name, path)


def test_a_broken_artifact_is_one_line(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    (results / "shufflenet_v2_x1_0" / "bench.json").write_text("{not json")
    assert summary.main(["--results", str(results), "--readme", str(ROOT / "README.md"), "--check"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "JSONDecodeError" in err


def test_left_out_quantizers_are_ranked_by_their_paired_gain(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    accuracy = results / "shufflenet_v2_x1_0" / "accuracy.json"
    data = json.loads(accuracy.read_text())
    base = data["half_quantized"]["activations_only"]["agreeing_views"]
    photos = sorted(base)

    def shifted(by: int) -> dict:  # the activations-only counts, `by` more agreeing views on the first photos
        views = {p: min(data["views_per_photo"], base[p] + (by if k < 20 else 0)) for k, p in enumerate(photos)}
        return {"agreement": 50.0 + by, "agreement_se": 0.5, "agreeing_views": views}

    data["left_out_quantizers"] = {"small": shifted(1), "none": shifted(0),
                                   "large": {**shifted(3), "joined": ["large", "large_part0", "large_part1"]}}
    accuracy.write_text(json.dumps(data))
    body = summary.decomposition(results)
    rows = [line for line in body.splitlines() if line.startswith("| ShuffleNetV2 x1.0 | `")]
    assert [row.split("`")[1] for row in rows] == ["large", "small", "none"]
    assert "`large` and 2 more on its range |" in rows[0] and "`small` |" in rows[1]
    assert "3 quantizers" in body and rows[2].endswith("| 0.00 ± 0.00 |")


def test_wider_activations_are_listed_by_width_and_paired_with_the_int8_model(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    accuracy = results / "shufflenet_v2_x1_0" / "accuracy.json"
    data = json.loads(accuracy.read_text())
    int8_views = data["agreeing_views"]

    below = sorted(p for p, n in int8_views.items() if n < data["views_per_photo"])

    def plus(by: int) -> dict:  # the int8 model's counts, one more agreeing view on `by` photos that had room
        return {"agreement": 99.0, "agreement_se": 0.1,
                "agreeing_views": {p: n + (p in below[:by]) for p, n in int8_views.items()}}

    data["activation_bits"] = {"w8a12": plus(30), "w32a12": plus(45), "w8a9": plus(10), "w32a9": plus(0),
                               "w8a24": plus(30), "w32a24": plus(45)}
    accuracy.write_text(json.dumps(data))
    rows = [line for line in summary.decomposition(results).splitlines()
            if line.startswith("| ShuffleNetV2 x1.0 | ") and line.split(" | ")[1].split(" ")[0] in ("8", "9", "12", "24")]
    assert [row.split(" | ")[1] for row in rows] == ["8 (the int8 model; only its activations quantized)", "9", "12",
                                                     "24 (rounding negligible: the ranges' clipping is left)"]
    gain = {row.split(" | ")[1]: [cell.split("(")[1].split(" ±")[0] for cell in row.split(" | ")[2:4]]
            for row in rows[1:]}
    assert len(below) >= 45
    assert float(gain["9"][1]) == 0.0 and 0 < float(gain["9"][0]) < float(gain["12"][0]) < float(gain["12"][1])
