"""The accuracy budget's search: stops within budget, respects max_trials, keeps only nodes that help."""

import math

import pytest

from quantize.accuracy.budget import Score, TuneSet, rank_candidates, search
from quantize.accuracy.sensitivity import Sensitivity, TensorError

from accuracy_models import conv_net, images, save


class FakeModel:
    """Each node kept in fp32 removes a fixed amount of drop and adds SQNR; records the trials asked for."""

    def __init__(self, base_drop, effects):
        self.base_drop, self.effects, self.calls = base_drop, effects, []

    def __call__(self, excluded):
        self.calls.append(list(excluded))
        gain = sum(self.effects.get(n, 0.0) for n in excluded)
        return Score(top1=70.0 - self.base_drop + gain, drop=self.base_drop - gain, agreement=90.0 + gain,
                     sqnr_db=20.0 + 3 * gain)


def test_within_budget_from_the_start_changes_nothing():
    fake = FakeModel(0.2, {"a": 1.0})
    result = search(["a"], fake, max_drop=0.3, max_trials=5)
    assert result.met and result.excluded == [] and fake.calls == [[]]
    assert len(result.trials) == 1


def test_stops_as_soon_as_the_drop_fits():
    fake = FakeModel(2.0, {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5, "e": 0.5})
    result = search(["a", "b", "c", "d", "e"], fake, max_drop=0.5, max_trials=10)
    assert result.met
    assert result.excluded == ["a", "b", "c"]
    assert fake.calls == [[], ["a"], ["a", "b"], ["a", "b", "c"]]
    assert result.best.score.drop == pytest.approx(0.5)


def test_respects_max_trials_and_returns_the_best_trial():
    fake = FakeModel(2.0, {"a": 0.5, "b": 0.5, "c": 0.5})
    result = search(["a", "b", "c"], fake, max_drop=0.1, max_trials=2)
    assert not result.met
    assert len(fake.calls) == 3  # trial 0 (as configured) + max_trials
    assert result.excluded == ["a", "b"] and result.best.score.drop == pytest.approx(1.0)


def test_zero_trials_measures_only():
    fake = FakeModel(2.0, {"a": 1.0})
    result = search(["a"], fake, max_drop=0.1, max_trials=0)
    assert not result.met and result.excluded == [] and fake.calls == [[]]


def test_a_node_that_does_not_help_is_not_kept():
    fake = FakeModel(1.0, {"useless": 0.0, "good": 1.0})
    result = search(["useless", "good"], fake, max_drop=0.0, max_trials=5)
    assert result.met and result.excluded == ["good"]
    assert fake.calls == [[], ["useless"], ["good"]]
    assert [t.kept for t in result.trials] == [True, False, True]


def test_user_exclusions_stay_and_are_not_reported_as_budget_nodes():
    fake = FakeModel(1.0, {"mine": 0.0, "a": 1.0})
    result = search(["a"], fake, max_drop=0.0, max_trials=3, base_excluded=["mine"])
    assert fake.calls == [["mine"], ["mine", "a"]]
    assert result.excluded == ["a"]


def _tensor(name, producer, op_type, sqnr, added):
    return TensorError(name, name + "_dq", producer, op_type, [], 0, sqnr_db=sqnr, added_db=added)


def test_ranking_maps_a_fused_activation_to_its_conv_and_skips_data_movement():
    model = conv_net()
    sensitivity = Sensitivity([_tensor("a1", "act1", "Clip", 20.0, 6.0), _tensor("c3", "conv3", "Conv", 18.0, 9.0),
                               _tensor("out", "flatten", "Flatten", 18.0, 1.0),
                               _tensor("a2", "act2", "Relu", 25.0, -1.0)], 18.0, 4, 0.0)
    ranked = rank_candidates(sensitivity, model, ["conv1", "conv2", "conv3", "flatten"])
    assert ranked == ["conv3", "conv1"]
    assert rank_candidates(sensitivity, model, ["conv1", "conv2", "conv3"], already=["conv3"]) == ["conv1"]


def test_tune_set_scores_a_model_against_itself_as_perfect(tmp_path):
    import numpy as np

    path = save(conv_net(), tmp_path / "m.onnx")
    before = path.read_bytes()
    batches = [(b, np.arange(len(b)) % 8) for b in images(16)]
    tune = TuneSet(path, batches)
    score = tune.score(path)
    assert tune.num_images == 16
    assert score.drop == 0 and score.agreement == 100 and math.isinf(score.sqnr_db)
    assert path.read_bytes() == before  # the model file is untouched
