"""Model cards: README.md written by save_pretrained / push_to_hub, its metadata, tables and round trip."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import make_target, make_tokenizer
from huggingface_hub import ModelCard, ModelCardData
from test_training_trainer import training_args
from transformers.utils.hub import PushToHubMixin

from dspark_hf import CalibrationData, DSparkDraftModel, DSparkModelCardData
from dspark_hf.calibration import CalibrationRound, calibration_report
from dspark_hf.evaluation import evaluate
from dspark_hf.model_card import SECTION_END, SECTION_START
from dspark_hf.training import DSparkTrainer

TARGET_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GAMMA = 3


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(64)


@pytest.fixture(scope="module")
def target():
    """A tiny Llama that claims a Hub id, as one loaded with `from_pretrained` would."""
    model = make_target("llama", vocab_size=64, hidden_size=32)
    model.name_or_path = TARGET_ID
    model.generation_config.eos_token_id = None
    return model


def make_draft(target, **overrides) -> DSparkDraftModel:
    torch.manual_seed(0)
    settings = dict(block_size=GAMMA, num_hidden_layers=1, markov_rank=8, mask_token_id=target.vocab_size - 1)
    return DSparkDraftModel.from_target(target, **{**settings, **overrides}).eval()


def fitted_report(biases: list[float] | None = None) -> dict:
    """A calibration report computed on hand-made rounds, temperatures 2, 1, 0.5 (and `biases`)."""
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    rounds = [
        CalibrationRound(3, 2, [logit(0.9), logit(0.6), logit(0.3)], prompt_index=0),
        CalibrationRound(3, 0, [logit(0.8), logit(0.4), logit(0.2)], prompt_index=1),
        CalibrationRound(2, 2, [logit(0.7), logit(0.7)], prompt_index=2),
    ]
    return calibration_report(
        CalibrationData(block_size=GAMMA, rounds=rounds), None, [2.0, 1.0, 0.5], biases=biases
    )


def read_card(directory: Path) -> ModelCard:
    return ModelCard.load(directory / "README.md")


def test_local_save_writes_card_with_metadata_architecture_tau_and_calibration(tmp_path, target, tokenizer):
    draft = make_draft(target, calibration_temperatures=[2.0, 1.0, 0.5])
    summaries = evaluate(
        target,
        tokenizer,
        draft,
        {"gsm8k": [["w1 w2 w3"]]},
        max_new_tokens=6,
        prompt_lookup_num_tokens=None,
        progress=False,
    )
    draft.model_card_data.add_evaluation(summaries, max_new_tokens=6, do_sample=False)
    draft.model_card_data.add_calibration(report := fitted_report())
    draft.model_card_data.training_data = "UltraChat, 1k conversations"
    draft.save_pretrained(tmp_path)

    card = read_card(tmp_path)
    assert card.data.library_name == "dspark_hf" and card.data.base_model == TARGET_ID
    assert card.data.pipeline_tag == "text-generation"
    assert {"speculative-decoding", "dspark"} <= set(card.data.tags)
    text = card.text
    assert f"# DSpark draft for `{TARGET_ID}`" in text
    assert f'DSparkDraftModel.from_pretrained("{tmp_path}", target_model=target)' in text
    for line in (
        "- block size γ: 3",
        "- draft layers: 1",
        "- sequential head: markov (rank 8)",
        "- confidence head: yes",
        "- calibration temperatures: 2.000, 1.000, 0.500",
        "- data: UltraChat, 1k conversations",
        "Settings: `max_new_tokens=6`, `do_sample=False`.",
    ):
        assert line in text
    tau = summaries[0]["tau"]
    assert f"| gsm8k | {tau:.2f} | 1 | 6 | " in text
    split = report["splits"]["fit"]
    for k, temperature in enumerate(report["temperatures"]):
        before, after = (
            split["before"]["positions"][k]["survival"],
            split["after"]["positions"][k]["survival"],
        )
        row = f"| {k + 1} | {temperature:.3f} | {before['count']} | "
        assert row + f"{100 * before['ece']:.1f}% | {100 * after['ece']:.1f}% |" in text
    assert "## Training" in text and "steps" not in text  # nothing invented


def test_card_without_data_says_not_recorded(tmp_path, targets):
    draft = make_draft(targets["llama"], markov_head_type="none")
    draft.save_pretrained(tmp_path)
    card = read_card(tmp_path)
    assert card.data.base_model is None  # the tiny target has no name
    assert "## Training\n\nNot recorded." in card.text and "## Evaluation\n\nNot recorded." in card.text
    assert "## Calibration\n\nNot calibrated." in card.text and "- sequential head: none" in card.text
    assert "|" not in card.text.split("## Training")[1]


def test_round_trip_keeps_card_data(tmp_path, target):
    draft = make_draft(target)
    draft.model_card_data.evaluation["mt-bench"] = {"tau": 2.5}
    draft.model_card_data.add_calibration(fitted_report())
    draft.model_card_data.notes = "Trained for a test."
    draft.save_pretrained(tmp_path / "a")
    loaded = DSparkDraftModel.from_pretrained(tmp_path / "a", target_model=target)
    assert loaded.model_card_data == draft.model_card_data
    loaded.save_pretrained(tmp_path / "b")
    assert read_card(tmp_path / "b").data.dspark_hf == read_card(tmp_path / "a").data.dspark_hf
    assert "| mt-bench | 2.50 |" in read_card(tmp_path / "b").text
    assert "These temperatures are not applied to this draft" in read_card(tmp_path / "b").text
    assert DSparkModelCardData.from_dict(draft.model_card_data.to_dict()) == draft.model_card_data


def test_card_records_calibration_biases(tmp_path, target):
    biases = [-1.0, 0.5, 0.25]
    draft = make_draft(target, calibration_temperatures=[2.0, 1.0, 0.5], calibration_biases=biases)
    draft.model_card_data.add_calibration(report := fitted_report(biases))
    draft.save_pretrained(tmp_path / "a")
    text = read_card(tmp_path / "a").text
    assert "- calibration biases: -1.000, +0.500, +0.250" in text
    assert "| k | T_k | b_k | samples | ECE before | ECE after |" in text
    after = report["splits"]["fit"]["after"]["positions"][0]["survival"]
    assert f"| 1 | 2.000 | -1.000 | {after['count']} | " in text and f"{100 * after['ece']:.1f}% |" in text
    loaded = DSparkDraftModel.from_pretrained(tmp_path / "a", target_model=target)
    assert [p["bias"] for p in loaded.model_card_data.calibration["positions"]] == biases
    loaded.config.calibration_biases = None
    loaded.save_pretrained(tmp_path / "b")
    assert "These biases are not applied to this draft" in read_card(tmp_path / "b").text


def test_existing_readme_is_updated_not_replaced(tmp_path, target):
    draft = make_draft(target)
    (tmp_path / "README.md").write_text(
        "---\nlicense: apache-2.0\ntags:\n- mine\n---\n# My draft\n\nHand-written.\n"
    )
    draft.save_pretrained(tmp_path)
    card = read_card(tmp_path)
    assert card.data.license == "apache-2.0" and card.data.tags[0] == "mine" and "dspark" in card.data.tags
    assert card.text.startswith("# My draft\n\nHand-written.\n") and SECTION_START in card.text
    # Text added after the generated section survives the next save; the section is rewritten, not repeated.
    (tmp_path / "README.md").write_text(str(card) + "\nMore notes.\n")
    draft.model_card_data.evaluation["gsm8k"] = {"tau": 3.25}
    draft.save_pretrained(tmp_path)
    text = read_card(tmp_path).text
    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1
    assert "Hand-written." in text and text.rstrip().endswith("More notes.") and "| gsm8k | 3.25 |" in text
    saved = (tmp_path / "README.md").read_text()
    draft.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == saved  # saving again changes nothing


def test_model_card_false_leaves_readme_alone(tmp_path, target):
    make_draft(target).save_pretrained(tmp_path, model_card=False)
    assert not (tmp_path / "README.md").exists()
    (tmp_path / "README.md").write_text("mine")
    make_draft(target).save_pretrained(tmp_path, model_card=False)
    assert (tmp_path / "README.md").read_text() == "mine"


def test_deepspec_layout_gets_a_card(tmp_path, target):
    draft = make_draft(target)
    draft.model_card_data.evaluation["humaneval"] = {"tau": 2.0}
    draft.save_pretrained(tmp_path, layout="deepspec")
    card = read_card(tmp_path)
    assert card.data.library_name == "dspark_hf" and "- checkpoint layout: deepspec" in card.text
    assert "reference (DeepSpec) layout" in card.text
    assert DSparkDraftModel.from_pretrained(tmp_path).model_card_data == draft.model_card_data


@pytest.mark.parametrize("via", ["push_to_hub", "save_pretrained"])
def test_push_to_hub_uploads_the_card(tmp_path, targets, monkeypatch, via):
    """transformers' placeholder card (a new Hub repo's) is replaced by the draft's card; tags are kept."""
    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

    def fake_upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        uploaded.update({p.name: p.read_bytes() for p in Path(working_dir).iterdir()})

    def placeholder_card(repo_id, tags=None, token=None):
        data = ModelCardData(tags=tags, library_name="transformers")
        return ModelCard.from_template(
            data, model_description="This model card has been automatically generated."
        )

    for module in ("transformers.utils.hub", "transformers.modeling_utils"):
        monkeypatch.setattr(f"{module}.hf_api", FakeApi)
        monkeypatch.setattr(f"{module}.create_and_tag_model_card", placeholder_card)
    monkeypatch.setattr(PushToHubMixin, "_upload_modified_files", fake_upload)
    draft = make_draft(targets["qwen3"])
    draft.add_model_tags(["custom"])
    draft.model_card_data.evaluation["gsm8k"] = {"tau": 3.5}
    if via == "push_to_hub":
        draft.push_to_hub("me/draft")
    else:
        draft.save_pretrained(tmp_path, push_to_hub=True, repo_id="me/draft")
    assert "model.safetensors" in uploaded and json.loads(uploaded["config.json"])["model_type"] == "dspark"
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.library_name == "dspark_hf" and {"custom", "dspark"} <= set(card.data.tags)
    assert "More Information Needed" not in card.text and "| gsm8k | 3.50 |" in card.text
    assert 'DSparkDraftModel.from_pretrained("me/draft", target_model=target)' in card.text


def test_trainer_records_steps_and_seed(tmp_path, target):
    draft = make_draft(target, target_layer_ids=[0, 2])
    rows = [{"input_ids": list(range(1, 13)), "loss_mask": [0] * 3 + [1] * 9}] * 4
    args = training_args(tmp_path, max_steps=2, num_anchors=2, seed=11)
    DSparkTrainer(
        model=draft, args=args, train_dataset=datasets.Dataset.from_list(rows), target_model=target
    ).train()
    assert (draft.model_card_data.training_steps, draft.model_card_data.seed) == (2, 11)
    draft.save_pretrained(tmp_path / "draft")
    assert "- steps: 2\n- seed: 11" in read_card(tmp_path / "draft").text
