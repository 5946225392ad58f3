"""Confidence calibration: metrics, Sequential Temperature Scaling (with optional biases), collection, threshold
sweep, CLI."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from conftest import briefly_train, make_target, make_tokenizer

from dspark_hf import DSparkDraftConfig, DSparkDraftModel
from dspark_hf.calibration import (
    DEFAULT_TEMPERATURE_GRID,
    CalibrationData,
    CalibrationRound,
    apply_calibration,
    auroc,
    brier_score,
    calibrate,
    calibration_metrics,
    calibration_report,
    collect_calibration_rounds,
    cross_fitted_metrics,
    expected_calibration_error,
    fit_sequential_calibration,
    fit_sequential_temperature_scaling,
    plot_reliability_diagram,
    plot_threshold_sweep,
    position_samples,
    reliability_bins,
    report_markdown,
    threshold_sweep,
)
from dspark_hf.cli import run_command
from dspark_hf.scheduling import CostTable, StaticThresholdPolicy
from dspark_hf.speculative.stats import SpeculationStats

PNG_MAGIC = b"\x89PNG"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def logit(p):
    return math.log(p / (1 - p))


# ----------------------------------------------------------------------------------------------------------------------
# Metrics against hand computations
# ----------------------------------------------------------------------------------------------------------------------


def test_ece_by_hand():
    # Two bins: {0.1, 0.4} has confidence 0.25 and accuracy 0.5; {0.6, 0.9} has 0.75 and 1.0.
    assert expected_calibration_error([0.1, 0.4, 0.6, 0.9], [0, 1, 1, 1], num_bins=2) == pytest.approx(0.25)
    # One bin: |mean confidence − accuracy|.
    assert expected_calibration_error([0.2, 0.4], [1, 1], num_bins=1) == pytest.approx(0.7)
    # Perfectly calibrated bins.
    assert expected_calibration_error([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0], num_bins=2) == 0.0
    # Confidence 1.0 falls in the last bin, 0.5 opens the upper bin of two.
    bins = reliability_bins([0.0, 0.5, 1.0], [0, 1, 1], num_bins=2)
    assert bins["count"] == [1, 2]
    assert bins["mean_confidence"] == [0.0, 0.75]
    assert bins["accuracy"] == [0.0, 1.0]
    assert bins["edges"] == [0.0, 0.5, 1.0]
    assert reliability_bins([0.9], [1], num_bins=3)["accuracy"] == [None, None, 1.0]


def test_auroc_and_brier_by_hand():
    # Pairs (positive, negative): 0.5>0.2, 0.5=0.5 (½), 0.8>0.2, 0.8>0.5 → 3.5 / 4.
    assert auroc([0.2, 0.5, 0.5, 0.8], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert auroc([0.1, 0.4, 0.6, 0.9], [0, 1, 1, 1]) == 1.0
    assert auroc([0.9, 0.1], [0, 1]) == 0.0
    assert auroc([0.3, 0.7], [1, 1]) is None
    assert brier_score([0.2, 0.5, 1.0], [0, 1, 1]) == pytest.approx((0.04 + 0.25 + 0.0) / 3)


@pytest.mark.parametrize(
    "confidences, outcomes, match",
    [
        ([0.5], [1, 0], "confidences but"),
        ([], [], "No samples"),
        ([1.5], [1], "probabilities"),
        ([0.5], [2], "0/1"),
    ],
)
def test_metric_input_errors(confidences, outcomes, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(confidences, outcomes)


# ----------------------------------------------------------------------------------------------------------------------
# Data, per-position samples, threshold sweep (hand-made rounds)
# ----------------------------------------------------------------------------------------------------------------------


def hand_rounds() -> CalibrationData:
    """γ = 3; σ(z) = [0.9, 0.6, 0.3] with 2 accepted; [0.8, 0.4, 0.2] with 0; [0.7, 0.7] (2 verified) with 2."""
    rounds = [
        CalibrationRound(3, 2, [logit(0.9), logit(0.6), logit(0.3)], prompt_index=0),
        CalibrationRound(3, 0, [logit(0.8), logit(0.4), logit(0.2)], prompt_index=1),
        CalibrationRound(2, 2, [logit(0.7), logit(0.7)], prompt_index=2),
    ]
    return CalibrationData(3, rounds)


def test_position_samples_follow_the_accepted_counts():
    data = hand_rounds()
    conditional = position_samples(data, "conditional")
    # Position 1: every round; 2: rounds whose token 1 survived (1 and 3); 3: round 1 only (round 3 verified 2).
    assert [y.tolist() for _, y in conditional] == [[1, 0, 1], [1, 1], [0]]
    np.testing.assert_allclose(conditional[1][0], [0.6, 0.7])
    survival = position_samples(data, "survival")
    # Survival: every round that verified ≥ k tokens, including those whose prefix was rejected.
    assert [y.tolist() for _, y in survival] == [[1, 0, 1], [1, 0, 1], [0, 0]]
    np.testing.assert_allclose(survival[2][0], [0.9 * 0.6 * 0.3, 0.8 * 0.4 * 0.2])
    scaled = position_samples(data, "conditional", temperatures=[1.0, 2.0, 1.0])
    np.testing.assert_allclose(
        scaled[1][0], [1 / (1 + math.exp(-logit(0.6) / 2)), 1 / (1 + math.exp(-logit(0.7) / 2))]
    )
    # A bias is added after the temperature: c = σ(z / T + b); survival multiplies the biased c_k.
    shifted = position_samples(data, "survival", temperatures=[1.0, 2.0, 1.0], biases=[-1.0, 0.5, 0.0])
    c1 = 1 / (1 + math.exp(-(logit(0.9) - 1.0)))
    c2 = 1 / (1 + math.exp(-(logit(0.6) / 2 + 0.5)))
    np.testing.assert_allclose(shifted[2][0][0], c1 * c2 * 0.3)
    with pytest.raises(ValueError, match="3 biases"):
        position_samples(data, biases=[0.0])
    with pytest.raises(ValueError, match="finite"):
        calibration_metrics(data, biases=[0.0, float("inf"), 0.0])

    metrics = calibration_metrics(data, num_bins=2)
    first = metrics["positions"][0]["conditional"]
    assert first["count"] == 3 and first["accuracy"] == pytest.approx(2 / 3)
    assert first["mean_confidence"] == pytest.approx(0.8)
    assert metrics["positions"][2]["survival"]["auroc"] is None  # one class
    # Position 3 conditional: one sample, confidence 0.3, rejected.
    assert metrics["positions"][2]["conditional"]["ece"] == pytest.approx(0.3)
    assert metrics["positions"][2]["conditional"]["brier"] == pytest.approx(0.09)


def test_threshold_sweep_by_hand():
    sweep = {s["threshold"]: s for s in threshold_sweep(hand_rounds(), thresholds=[0.0, 0.5, 0.85, 0.95])}
    # Threshold 0: lengths [3, 3, 2], accepted [2, 0, 2].
    assert sweep[0.0]["tokens_per_step"] == pytest.approx(8 / 3)
    assert sweep[0.0]["accepted_per_step"] == pytest.approx(4 / 3)
    assert sweep[0.0]["rejected_per_step"] == pytest.approx(4 / 3)
    assert sweep[0.0]["acceptance_rate"] == pytest.approx(0.5)
    assert sweep[0.0]["tau"] == pytest.approx(7 / 3)
    # 0.5: lengths [2, 1, 2], accepted [2, 0, 2].
    assert sweep[0.5]["tokens_per_step"] == pytest.approx(5 / 3)
    assert sweep[0.5]["rejected_per_step"] == pytest.approx(1 / 3)
    assert sweep[0.5]["acceptance_rate"] == pytest.approx(0.8)
    # 0.85: lengths [1, 0, 0], accepted [1, 0, 0].
    assert sweep[0.85]["tokens_per_step"] == pytest.approx(1 / 3)
    assert sweep[0.85]["acceptance_rate"] == 1.0
    assert sweep[0.85]["tau"] == pytest.approx(4 / 3)
    # 0.95: nothing verified.
    assert sweep[0.95]["tokens_per_step"] == 0.0 and sweep[0.95]["acceptance_rate"] is None
    assert sweep[0.95]["tau"] == 1.0 and sweep[0.95]["rounds"] == 3
    # Temperatures change the confidences the threshold sees: T_1 = 4 pulls 0.9 to σ(logit(0.9)/4) ≈ 0.63.
    calibrated = threshold_sweep(hand_rounds(), thresholds=[0.85], temperatures=[4.0, 1.0, 1.0])[0]
    assert calibrated["tokens_per_step"] == 0.0
    # So do biases: b_1 = −1 pulls 0.9 to σ(logit(0.9) − 1) ≈ 0.77; b_1 = +1 lifts 0.8 and 0.7 to ≈ 0.92, 0.86.
    assert threshold_sweep(hand_rounds(), [0.85], biases=[-1.0, 0.0, 0.0])[0]["tokens_per_step"] == 0.0
    assert threshold_sweep(hand_rounds(), [0.85], biases=[1.0, 0.0, 0.0])[0]["tokens_per_step"] == 1.0


def test_threshold_sweep_matches_the_policy():
    data = hand_rounds()
    for threshold in (0.0, 0.35, 0.65, 0.75):
        rows = [[1 / (1 + math.exp(-z)) for z in r.confidence_logits] for r in data.rounds]
        lengths = StaticThresholdPolicy(threshold).select_lengths(rows)
        expected = sum(lengths) / len(lengths)
        assert threshold_sweep(data, [threshold])[0]["tokens_per_step"] == pytest.approx(expected)


def test_calibration_data_validation_json_and_split(tmp_path):
    with pytest.raises(ValueError, match="accepted"):
        CalibrationRound(2, 3, [0.0, 0.0])
    with pytest.raises(ValueError, match="confidence logits"):
        CalibrationRound(2, 1, [0.0])
    with pytest.raises(ValueError, match="block_size"):
        CalibrationData(2, [CalibrationRound(3, 0, [0.0] * 3)])
    data = hand_rounds()
    data.metadata["note"] = "hand"
    data.save(tmp_path / "rounds.json")
    loaded = CalibrationData.load(tmp_path / "rounds.json")
    assert loaded == data
    with pytest.raises(ValueError, match="Not a"):
        CalibrationData.from_json(json.dumps({"format": "other"}))
    fit, test = data.split(1 / 3, seed=0)
    assert fit.num_rounds == 2 and test.num_rounds == 1
    assert {r.prompt_index for r in fit.rounds}.isdisjoint({r.prompt_index for r in test.rounds})
    assert data.split(0.0)[1].num_rounds == 0
    with pytest.raises(ValueError, match="test_fraction"):
        data.split(1.0)
    stats = SpeculationStats(block_size=3)
    stats.record_round(2, 1, [])
    with pytest.raises(ValueError, match="no confidence head"):
        CalibrationData(3).add_stats(stats)
    looked_up = SpeculationStats(block_size=10)
    looked_up.record_round(10, 4, [], looked_up=True)
    with pytest.raises(ValueError, match="without prompt_lookup_num_tokens"):
        CalibrationData(10).add_stats(looked_up)


# ----------------------------------------------------------------------------------------------------------------------
# Sequential Temperature Scaling on synthetic data with known temperatures
# ----------------------------------------------------------------------------------------------------------------------

TRUE_TEMPERATURES = [2.0, 0.5, 1.5, 3.0]


def synthetic_rounds(
    num_rounds: int = 50000, temperatures=TRUE_TEMPERATURES, seed: int = 0
) -> CalibrationData:
    """z_k = T_k · logit(p_k) with p_k ~ U(0.2, 0.97); token k survives its prefix with probability p_k."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.2, 0.97, size=(num_rounds, len(temperatures)))
    return rounds_from_probabilities(p, np.asarray(temperatures) * np.log(p / (1 - p)), rng)


def rounds_from_probabilities(p: np.ndarray, z: np.ndarray, rng: np.random.Generator) -> CalibrationData:
    """Rounds with confidence logits `z` `(rounds, γ)` whose token k survives its prefix with probability p_k."""
    gamma = p.shape[1]
    survived = rng.random(p.shape) < p
    accepted = np.where(survived.all(axis=1), gamma, np.argmin(survived, axis=1))
    rounds = [
        CalibrationRound(gamma, int(a), row.tolist(), prompt_index=i)
        for i, (a, row) in enumerate(zip(accepted, z, strict=True))
    ]
    return CalibrationData(gamma, rounds)


@pytest.fixture(scope="module")
def synthetic():
    data = synthetic_rounds()
    return data, fit_sequential_temperature_scaling(data)


def test_sts_recovers_known_temperatures(synthetic):
    data, fitted = synthetic
    assert len(fitted) == 4 and all(t in DEFAULT_TEMPERATURE_GRID for t in fitted)
    # Later positions are identified less sharply (the survival ECE flattens as a_k shrinks): 50k rounds keep all
    # four within 15% here.
    for t_fit, t_true in zip(fitted, TRUE_TEMPERATURES, strict=True):
        assert abs(math.log(t_fit / t_true)) < math.log(1.15), (fitted, TRUE_TEMPERATURES)
    before, after = calibration_metrics(data), calibration_metrics(data, fitted)
    for b, a in zip(before["positions"], after["positions"], strict=True):
        assert a["survival"]["ece"] < b["survival"]["ece"]
        assert a["survival"]["ece"] < 0.02
        assert a["survival"]["brier"] < b["survival"]["brier"]
        # Temperature scaling preserves the order of c_k, hence the conditional AUROC.
        assert a["conditional"]["auroc"] == pytest.approx(b["conditional"]["auroc"])
    assert after["mean"]["survival"]["ece"] < before["mean"]["survival"]["ece"] / 3


def test_sts_is_sequential_with_earlier_temperatures_fixed(synthetic):
    data, fitted = synthetic
    logits, _, accepted = data.arrays()
    y = (accepted > 1).astype(float)

    def best_second(t1):
        first = 1 / (1 + np.exp(-logits[:, 0] / t1))
        eces = [
            expected_calibration_error(first / (1 + np.exp(-logits[:, 1] / t)), y)
            for t in DEFAULT_TEMPERATURE_GRID
        ]
        return DEFAULT_TEMPERATURE_GRID[int(np.argmin(eces))]

    assert fitted[1] == best_second(fitted[0])  # T_2 is fitted on top of the fitted T_1 ...
    assert best_second(1.0) != fitted[1]  # ... which matters: with T_1 = 1 the optimum differs.
    # Later positions never move earlier temperatures.
    prefix = CalibrationData(
        2, [CalibrationRound(2, min(r.accepted, 2), r.confidence_logits[:2]) for r in data.rounds]
    )
    assert fit_sequential_temperature_scaling(prefix) == fitted[:2]


def test_sts_positions_without_data_and_grid_checks():
    data = CalibrationData(3, [CalibrationRound(1, 1, [2.0]), CalibrationRound(1, 0, [-1.0])])
    temperatures = fit_sequential_temperature_scaling(data)
    assert temperatures[1:] == [1.0, 1.0]
    # A flat objective keeps T = 1 (ties go to the temperature closest to 1).
    assert fit_sequential_temperature_scaling(
        CalibrationData(1, [CalibrationRound(1, 1, [50.0])]), grid=[0.5, 1.0, 2.0]
    ) == [1.0]
    for grid in ([], [0.0, 1.0], [float("nan")]):
        with pytest.raises(ValueError, match="grid"):
            fit_sequential_temperature_scaling(data, grid=grid)
    with pytest.raises(ValueError, match="temperatures"):
        calibration_metrics(data, temperatures=[1.0])


def shifted_rounds(
    num_rounds: int = 5000, shift: float = 1.0, gamma: int = 3, seed: int = 0
) -> CalibrationData:
    """An overconfident head: z_k = logit(p_k) + `shift`, so the true conditional probability is σ(z_k − shift)
    (T = 1, b = −shift), with p_k ~ U(0.2, 0.97). A temperature alone cannot undo the shift."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.2, 0.97, size=(num_rounds, gamma))
    return rounds_from_probabilities(p, np.log(p / (1 - p)) + shift, rng)


@pytest.fixture(scope="module")
def shifted():
    return shifted_rounds()


def survival_eces(data: CalibrationData, temperatures, biases=None) -> list[float]:
    return [p["survival"]["ece"] for p in calibration_metrics(data, temperatures, biases=biases)["positions"]]


def test_sts_bias_removes_a_shift_that_temperatures_cannot(shifted):
    sts = survival_eces(shifted, fit_sequential_temperature_scaling(shifted))
    temperatures, biases = fit_sequential_calibration(shifted, "sts_bias")
    with_bias = survival_eces(shifted, temperatures, biases)
    for k, (e_sts, e_bias) in enumerate(zip(sts, with_bias, strict=True)):
        assert e_bias < 0.015 and e_bias < e_sts / 3, (k, sts, with_bias)
    # Position 1 is identified sharply by the ECE objective: T_1 ≈ 1, b_1 ≈ −1.
    assert abs(math.log(temperatures[0])) < math.log(1.15) and abs(biases[0] + 1) < 0.15, (
        temperatures,
        biases,
    )
    # The log loss recovers the shift at every position (ECE alone is flat in later positions' spread).
    temperatures, biases = fit_sequential_calibration(shifted, "sts_bias", objective="log_loss")
    for t, b in zip(temperatures, biases, strict=True):
        assert abs(math.log(t)) < math.log(1.2) and abs(b + 1) < 0.2, (temperatures, biases)
    assert max(survival_eces(shifted, temperatures, biases)) < 0.025


def test_sts_bias_with_zero_bias_is_sts(shifted):
    data = synthetic_rounds(num_rounds=5000)
    for rounds in (data, shifted):
        temperatures = fit_sequential_temperature_scaling(rounds)
        assert fit_sequential_calibration(rounds) == (temperatures, None)
        assert fit_sequential_calibration(rounds, "sts_bias", bias_grid=[0.0]) == (
            temperatures,
            [0.0] * rounds.block_size,
        )
    log_loss = fit_sequential_calibration(data, "sts", objective="log_loss")[0]
    assert log_loss == fit_sequential_calibration(data, "sts_bias", bias_grid=[0.0], objective="log_loss")[0]


def test_fit_sequential_calibration_checks():
    data = CalibrationData(2, [CalibrationRound(1, 1, [2.0]), CalibrationRound(1, 0, [-1.0])])
    temperatures, biases = fit_sequential_calibration(data, "sts_bias")
    assert temperatures[1] == 1.0 and biases[1] == 0.0  # position 2 was never verified
    with pytest.raises(ValueError, match="method must be one of"):
        fit_sequential_calibration(data, "platt")
    with pytest.raises(ValueError, match="objective must be one of"):
        fit_sequential_calibration(data, objective="brier")
    with pytest.raises(ValueError, match="bias grid"):
        fit_sequential_calibration(data, "sts_bias", bias_grid=[0.0, float("nan")])


def test_folds_partition_prompts_evenly():
    data = synthetic_rounds(num_rounds=10)
    folds = data.folds(3, seed=1)
    prompts = [{r.prompt_index for r in fold.rounds} for fold in folds]
    assert sorted(len(p) for p in prompts) == [3, 3, 4] and set().union(*prompts) == set(range(10))
    assert [f.rounds for f in data.folds(3, seed=1)] == [f.rounds for f in folds]
    for bad in (1, 11):
        with pytest.raises(ValueError, match="num_folds"):
            data.folds(bad)


def test_cross_fitted_metrics_pool_out_of_fold_fits(synthetic):
    data, _ = synthetic
    # With T = 1 as the only candidate every fold's fit is the identity: "after" equals "before" on all rounds.
    identity = cross_fitted_metrics(data, num_folds=3, grid=[1.0])
    for before, after in zip(identity["before"]["positions"], identity["after"]["positions"], strict=True):
        for kind in ("survival", "conditional"):
            assert after[kind]["count"] == before[kind]["count"]
            assert after[kind]["ece"] == pytest.approx(before[kind]["ece"])
            assert after[kind]["brier"] == pytest.approx(before[kind]["brier"])
    # Each fold recovers the true temperatures from the others, so the pooled out-of-sample ECE becomes small.
    cross = cross_fitted_metrics(data, num_folds=2, seed=3)
    assert cross["rounds"] == data.num_rounds and cross["prompts"] == data.num_rounds and len(cross["parameters"]) == 2
    for fold in cross["parameters"]:
        assert fold["temperatures"][0] == pytest.approx(TRUE_TEMPERATURES[0], rel=0.1) and fold["biases"] is None
    before = [p["survival"]["ece"] for p in cross["before"]["positions"]]
    after = [p["survival"]["ece"] for p in cross["after"]["positions"]]
    assert before[0] > 0.05 and all(a < 0.015 for a in after), (before, after)


def test_report_and_plots(synthetic, tmp_path):
    pytest.importorskip("matplotlib")
    data, fitted = synthetic
    fit, test = data.split(0.25)
    report = calibration_report(fit, test, fitted, thresholds=[0.0, 0.5])
    assert report["evaluation_split"] == "test"
    assert report["splits"]["test"]["rounds"] == test.num_rounds
    assert [s["threshold"] for s in report["threshold_sweep"]["calibrated"]] == [0.0, 0.5]
    markdown = report_markdown(report)
    assert markdown.count("\n| ") >= 4 + 2 + 2
    json.dumps(report)  # serialisable
    plot_reliability_diagram(test, fitted, tmp_path / "rel.png")
    plot_reliability_diagram(test, None, tmp_path / "cond.png", kind="conditional", positions=[1, 3])
    plot_reliability_diagram(test, None, tmp_path / "bias.png", biases=[-0.5, 0.0, 0.5, 1.0])
    plot_threshold_sweep(report["threshold_sweep"]["raw"], tmp_path / "sweep.png")
    for name in ("rel.png", "cond.png", "bias.png", "sweep.png"):
        assert (tmp_path / name).read_bytes()[:4] == PNG_MAGIC
    with pytest.raises(ValueError, match="positions"):
        plot_reliability_diagram(test, fitted, tmp_path / "bad.png", positions=[5])


# ----------------------------------------------------------------------------------------------------------------------
# Drafts: temperatures in the config, collection from generate()
# ----------------------------------------------------------------------------------------------------------------------

GAMMA = 4


def new_draft(target, seed: int = 1) -> DSparkDraftModel:
    torch.manual_seed(seed)
    return DSparkDraftModel.from_target(
        target,
        block_size=GAMMA,
        markov_rank=16,
        num_hidden_layers=1,
        mask_token_id=target.config.vocab_size - 1,
    ).eval()


@pytest.fixture(scope="module")
def target():
    return make_target("llama")


@pytest.fixture(scope="module")
def trained_draft(target):
    return briefly_train(new_draft(target), target, steps=60)


def test_temperatures_round_trip_and_change_calibrated_confidence(target, tmp_path):
    draft = new_draft(target)
    z = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    raw = draft.calibrated_confidence(z)
    assert apply_calibration(draft, [2.0, 0.5, 1.0, 4.0]) is draft
    draft.save_pretrained(tmp_path)
    loaded = DSparkDraftModel.from_pretrained(tmp_path, target_model=target)
    assert loaded.config.calibration_temperatures == [2.0, 0.5, 1.0, 4.0]
    calibrated = loaded.calibrated_confidence(z)
    torch.testing.assert_close(calibrated, torch.sigmoid(z / torch.tensor([2.0, 0.5, 1.0, 4.0])))
    assert not torch.allclose(calibrated, raw)
    with pytest.raises(ValueError, match="one per block position"):
        apply_calibration(draft, [1.0, 1.0])
    with pytest.raises(ValueError, match="> 0"):
        apply_calibration(draft, [1.0, 0.0, 1.0, 1.0])


def test_biases_round_trip_and_are_applied_at_inference(target, tmp_path):
    draft = new_draft(target)
    temperatures, biases = [2.0, 0.5, 1.0, 4.0], [-1.0, 0.25, 0.0, 2.0]
    apply_calibration(draft, temperatures, biases)
    draft.save_pretrained(tmp_path)
    loaded = DSparkDraftModel.from_pretrained(tmp_path, target_model=target)
    assert loaded.config.calibration_biases == biases
    z = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, 1.0, -2.0, -0.5]])
    by_hand = torch.sigmoid(z / torch.tensor(temperatures) + torch.tensor(biases))
    torch.testing.assert_close(loaded.calibrated_confidence(z), by_hand)
    torch.testing.assert_close(
        loaded.calibrated_confidence(z[:, 1:3], positions=slice(1, 3)), by_hand[:, 1:3]
    )
    # Biases without temperatures; applying temperatures only clears earlier biases.
    loaded.config.calibration_temperatures = None
    torch.testing.assert_close(loaded.calibrated_confidence(z), torch.sigmoid(z + torch.tensor(biases)))
    assert apply_calibration(loaded, temperatures).config.calibration_biases is None
    with pytest.raises(ValueError, match="4 biases"):
        apply_calibration(loaded, temperatures, [0.0])
    # Generation sees the biased confidences: with a threshold of 0.5, b = −30 verifies nothing, b = +30 everything.
    ids = torch.tensor([[3, 5, 7, 9]])
    for bias, proposed in ((-30.0, 0), (30.0, GAMMA)):
        apply_calibration(draft, [1.0] * GAMMA, [bias] * GAMMA)
        out = target.generate(
            ids, attention_mask=torch.ones_like(ids), assistant_model=draft, max_new_tokens=12,
            verification_policy=StaticThresholdPolicy(0.5), return_dict_in_generate=True,
        )
        assert out.speculation_stats.proposed[0] == proposed


def test_config_validates_biases():
    assert DSparkDraftConfig(block_size=4).calibration_biases is None  # configs without biases load unchanged
    with pytest.raises(
        ValueError, match=r"calibration_biases has 2 entries but block_size is 4; give one bias per"
    ):
        DSparkDraftConfig(block_size=4, calibration_biases=[0.0, 1.0])
    with pytest.raises(ValueError, match="must all be finite"):
        DSparkDraftConfig(block_size=2, calibration_biases=[0.0, float("nan")])


def test_collect_calibration_rounds_matches_generation(target, trained_draft):
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 90, (n,), generator=generator) for n in (5, 7, 4)]
    max_new_tokens = 30
    data = collect_calibration_rounds(target, trained_draft, prompts, max_new_tokens=max_new_tokens)
    assert data.block_size == GAMMA and data.metadata["num_prompts"] == 3
    with pytest.raises(ValueError, match="drop verification_policy"):
        collect_calibration_rounds(
            target, trained_draft, prompts, generation_kwargs={"verification_policy": StaticThresholdPolicy(0.99)}
        )
    # The last prompt's rounds are exactly those of the same (greedy) generate() call.
    ids = prompts[2].unsqueeze(0)
    stats = target.generate(
        ids, attention_mask=torch.ones_like(ids), assistant_model=trained_draft, max_new_tokens=max_new_tokens,
        do_sample=False, return_dict_in_generate=True,
    ).speculation_stats
    last = [r for r in data.rounds if r.prompt_index == 2]
    assert [r.proposed for r in last] == stats.proposed and [r.accepted for r in last] == stats.accepted
    assert [r.confidence_logits for r in last] == stats.confidence_logits
    # Full-block verification: every round verified the whole block, or what was left before max_length. The
    # prefill pass (which proposes nothing and is not a round) adds the first token.
    for index, prompt in enumerate(prompts):
        length, end = len(prompt) + 1, len(prompt) + max_new_tokens
        for r in (r for r in data.rounds if r.prompt_index == index):
            assert r.proposed == max(0, min(GAMMA, end - length - 1))
            length += r.accepted + 1
        assert length == end
    # Conditional accuracy / survival per position agree with SpeculationStats' definitions.
    merged = SpeculationStats(block_size=GAMMA)
    for r in data.rounds:
        merged.record_round(r.proposed, r.accepted, r.confidence_logits)
    metrics = calibration_metrics(data)
    for k, position in enumerate(metrics["positions"]):
        assert position["conditional"]["accuracy"] == pytest.approx(merged.conditional_acceptance()[k])
        assert position["survival"]["accuracy"] == pytest.approx(merged.prefix_survival()[k])
    first = metrics["positions"][0]["conditional"]
    assert 0 < first["accuracy"] < 1  # a trained draft: some accepted, some rejected rounds
    assert first["count"] == sum(r.proposed > 0 for r in data.rounds)


def test_collect_text_prompts_and_errors(target, trained_draft):
    tokenizer = make_tokenizer()
    data = collect_calibration_rounds(
        target,
        trained_draft,
        ["w1 w2 w3", [{"role": "user", "content": "w4"}]],
        tokenizer=tokenizer,
        max_new_tokens=8,
    )
    assert {r.prompt_index for r in data.rounds} == {0, 1}
    with pytest.raises(ValueError, match="tokenizer"):
        collect_calibration_rounds(target, trained_draft, ["w1"], max_new_tokens=4)
    no_head = DSparkDraftModel.from_target(target, block_size=GAMMA, confidence_head=False, mask_token_id=95)
    with pytest.raises(ValueError, match="no confidence head"):
        collect_calibration_rounds(target, no_head, [torch.tensor([1, 2])], max_new_tokens=4)


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_calibrate_and_refit(target, trained_draft, tmp_path):
    target_dir, draft_dir, out = tmp_path / "target", tmp_path / "draft", tmp_path / "out"
    target.save_pretrained(target_dir)
    make_tokenizer().save_pretrained(target_dir)
    trained_draft.save_pretrained(draft_dir)
    prompts = tmp_path / "prompts.jsonl"
    too_long = json.dumps({"turns": [" ".join(["w1"] * 80)]})
    prompts.write_text(
        "\n".join([too_long] + [json.dumps({"turns": [f"w{i} w{i + 1} w{i + 2}"]}) for i in range(5)])
    )
    report = run_command(
        [
            "calibrate",
            "--target",
            str(target_dir),
            "--draft",
            str(draft_dir),
            "--prompts",
            str(prompts),
            "--limit",
            "4",
            "--max-new-tokens",
            "16",
            "--test-fraction",
            "0.25",
            "--thresholds",
            "0",
            "0.5",
            "--max-prompt-tokens",
            "40",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert report["splits"]["fit"]["prompts"] == 3 and report["splits"]["test"]["prompts"] == 1
    calibrated = DSparkDraftModel.from_pretrained(out / "draft", target_model=target)
    assert calibrated.config.calibration_temperatures == report["temperatures"]
    card = (out / "draft" / "README.md").read_text()
    assert "## Calibration" in card and f"{report['temperatures'][0]:.3f}" in card
    assert calibrated.model_card_data.calibration["rounds"] == report["splits"]["test"]["rounds"]
    assert json.loads((out / "metrics.json").read_text())["temperatures"] == report["temperatures"]
    assert "Sequential Temperature Scaling" in (out / "report.md").read_text()
    assert CalibrationData.load(out / "calibration_rounds.json").metadata["num_prompts"] == 4
    if HAS_MATPLOTLIB:
        for name in ("reliability_survival.png", "reliability_conditional.png", "threshold_sweep.png"):
            assert (out / name).read_bytes()[:4] == PNG_MAGIC
    # Refit from the saved rounds, without the target.
    refit = ["calibrate", "--draft", str(draft_dir), "--rounds", str(out / "calibration_rounds.json")]
    again = run_command(refit + ["--test-fraction", "0.25", "--cross-fit", "2", "--out", str(tmp_path / "again")])
    assert again["temperatures"] == report["temperatures"] and again["biases"] is None
    assert again["cross_fitted"]["folds"] == 2 and again["cross_fitted"]["prompts"] == 4
    assert "## Cross-fitted: 2 folds" in (tmp_path / "again" / "report.md").read_text()
    biased = run_command(
        refit + "--test-fraction 0.25 --method sts_bias --objective log_loss".split() + ["--out", str(tmp_path / "bias")]
    )
    assert len(biased["biases"]) == GAMMA and biased["fit"] == {"method": "sts_bias", "objective": "log_loss"}
    assert (
        DSparkDraftModel.from_pretrained(tmp_path / "bias" / "draft").config.calibration_biases
        == biased["biases"]
    )
    assert "b_k" in (tmp_path / "bias" / "report.md").read_text()
    with pytest.raises(SystemExit, match="--prompts"):
        run_command(["calibrate", "--target", str(target_dir), "--draft", str(draft_dir), "--out", str(out)])


def test_calibrate_fits_applies_records_and_saves(target, synthetic, tmp_path):
    data, _ = synthetic
    draft = new_draft(target)
    result = calibrate(None, draft, rounds=data, test_fraction=0.25, seed=3, output_dir=tmp_path / "out")
    assert result.draft is draft
    # The fit split is the one CalibrationData.split gives, and the fit is fit_sequential_calibration's on it.
    fit_data, test_data = data.split(0.25, 3)
    assert result.fit_data.num_rounds == fit_data.num_rounds and result.test_data.num_rounds == test_data.num_rounds
    expected, _ = fit_sequential_calibration(fit_data)
    assert draft.config.calibration_temperatures == result.report["temperatures"] == list(expected)
    for t_fit, t_true in zip(expected, TRUE_TEMPERATURES, strict=True):
        assert abs(math.log(t_fit / t_true)) < math.log(1.2)
    assert draft.model_card_data.calibration is not None
    assert "Sequential Temperature Scaling" in result.markdown
    saved = DSparkDraftModel.from_pretrained(tmp_path / "out" / "draft", target_model=target)
    assert saved.config.calibration_temperatures == result.report["temperatures"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["temperatures"] == result.report["temperatures"]


def test_calibrate_refuses_rounds_of_another_block_size_and_missing_inputs(target):
    draft = new_draft(target)
    with pytest.raises(ValueError, match="block size 3 but the draft's is 4"):
        calibrate(None, draft, rounds=synthetic_rounds(200, temperatures=[1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="Pass `target` and `prompts`"):
        calibrate(None, draft)


def test_cli_calibrate_refuses_empty_prompts_before_loading_models(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    arguments = ["calibrate", "--target", str(tmp_path / "no-such-target"), "--draft", "d", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="holds no prompts"):
        run_command([*arguments, "--prompts", str(tmp_path / "empty.jsonl")])


def test_cli_profile(target, tmp_path):
    target_dir, draft_dir = tmp_path / "target", tmp_path / "draft"
    target.save_pretrained(target_dir)
    new_draft(target).save_pretrained(draft_dir)
    profile = ["profile", "--target", str(target_dir), "--dtype", "float32", "--repeats", "1", "--warmup", "0"]
    table = run_command(
        profile
        + "--batch-sizes 1 2 4 --context-length 8 --smooth monotone --draft-requests 1 3".split()
        + ["--out", str(tmp_path / "table.json"), "--plot", str(tmp_path / "table.png"), "--draft", str(draft_dir)]
    )
    loaded = CostTable.load(tmp_path / "table.json")
    assert loaded.batch_tokens == [1, 2, 4] and loaded.smooth == "monotone"
    assert loaded.draft_requests == [1, 3] and all(s > 0 for s in loaded.draft_seconds)
    assert loaded.metadata["draft"] == str(draft_dir)
    assert loaded.raw_rows == table.raw_rows and loaded.metadata["shape"] == "1xB"
    if HAS_MATPLOTLIB:
        assert (tmp_path / "table.png").read_bytes()[:4] == PNG_MAGIC
    two_contexts = run_command(
        profile + "--batch-sizes 1 2 --context-length 4 8 --shape Bx1".split() + ["--out", str(tmp_path / "buckets.json")]
    )
    assert two_contexts.context_lengths == [4, 8]
    shaped = run_command(
        profile + "--batch-sizes 1 2 --requests 1 2 --context-length 8 --shape RxW".split()
        + ["--out", str(tmp_path / "shaped.json"), "--plot", str(tmp_path / "shaped.png")]
    )
    assert CostTable.load(tmp_path / "shaped.json").requests == [1, 2] and shaped.batch_tokens == [1, 2]
    with pytest.raises(SystemExit, match="one context length"):
        run_command(profile + "--shape RxW --context-length 4 8".split() + ["--out", str(tmp_path / "x.json")])
