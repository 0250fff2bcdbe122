"""Stage settings: each numeric setting is checked against its allowed range before a stage does any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from monai_histodiff.bundle.settings import SETTING_RULES, InvalidSettingError, SettingRule, check_settings

REPO = Path(__file__).resolve().parents[1]
STAGE_BUNDLES = ["pretrain_autoencoder", "pretrain_diffusion", "train_aux_classifier", "finetune",
                 "train_latent_classifier", "generate", "select", "train_downstream", "evaluate"]


@pytest.mark.parametrize("rule, good, bad", [
    (SettingRule(low=1, integer=True), [1, 7, 3.0], [0, -2, 2.5, "3", None, True, float("inf")]),
    (SettingRule(low=0, low_open=True), [1e-6, 4.5e-6, 2], [0, -1e-3, float("nan"), "1e-3"]),
    (SettingRule(low=0, high=1, high_open=True, optional=True), [None, 0, 0.99], [1, 1.5, -0.1]),
    (SettingRule(low=0, high=100, low_open=True), [0.5, 100], [0, 100.5]),
])
def test_rule_accepts_exactly_its_range(rule, good, bad):
    assert all(rule.accepts(v) for v in good), [v for v in good if not rule.accepts(v)]
    assert not any(rule.accepts(v) for v in bad), [v for v in bad if rule.accepts(v)]


def test_rule_describes_its_range():
    assert SETTING_RULES["num_inference_steps"].describe() == "an integer >= 1"
    assert SETTING_RULES["val_fraction"].describe() == "a real number in [0, 1)"
    assert SETTING_RULES["label_per_class"].describe().startswith("None or an integer >= 1")
    assert SETTING_RULES["lr"].describe() == "a real number > 0"


def test_check_settings_names_every_bad_setting_with_its_range():
    check_settings("generate", ratio=2.0, counts=[3, 0], guidance_window=[0, 400], num_inference_steps=50,
                   guidance_scale=0.0, eta=0.0, label_per_class=None)
    with pytest.raises(InvalidSettingError) as err:
        check_settings("generate", ratio=-1, counts={"aca": 2, "n": -1}, guidance_window=[500, 100],
                       num_inference_steps=0, guidance_scale="strong", batch_size=16)
    text = str(err.value)
    assert text.startswith("generate: 5 settings outside the allowed ranges")
    for line in ["--ratio=-1: a real number > 0", "--counts={'aca': 2, 'n': -1}: None, a list of integers >= 0",
                 "--guidance_window=[500, 100]: None or [t_min, t_max]", "--num_inference_steps=0: an integer >= 1",
                 "--guidance_scale='strong': a real number >= 0"]:
        assert line in text, (line, text)
    assert "batch_size" not in text


def test_a_setting_without_a_rule_is_a_bug_not_a_user_error():
    with pytest.raises(KeyError, match="no rule for setting 'learning_rate'"):
        check_settings("train_downstream", learning_rate=1e-3)


@pytest.mark.parametrize("stage", STAGE_BUNDLES)
def test_every_stage_checks_every_numeric_setting_first(stage):
    """The check is the first thing a stage runs, and it covers every numeric top-level setting of the bundle (its
    own, the per-stage hparams and the shared ones of common.json that the stage refers to), so a new setting cannot
    be added unchecked."""
    config = json.loads((REPO / "bundles" / f"{stage}.json").read_text())
    common = json.loads((REPO / "bundles" / "common.json").read_text())
    first = config["initialize"][0]
    assert first.startswith("$monai_histodiff.bundle.check_settings(@stage, "), first
    checked = set(re.findall(r"(\w+)=@(\w+)", first))
    assert all(k == v for k, v in checked), checked

    def numeric(value) -> bool:
        if isinstance(value, str):
            return value.startswith("@hparams#")
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    used = set(re.findall(r"@(\w+)", json.dumps(config)))  # shared keys the stage reads (common.json, merged first)
    for key in sorted(used & set(common) - set(config)):  # and what the shared definitions it reads refer to
        used |= set(re.findall(r"@(\w+)", json.dumps(common[key])))
    settings = {k for k, v in config.items() if numeric(v)} | {k for k, v in common.items() if k in used and numeric(v)}
    assert settings, stage
    assert settings <= {k for k, _ in checked}, sorted(settings - {k for k, _ in checked})


def test_the_old_engines_path_still_checks_settings():
    """Adaptation kits exported before the bundle layer had its own package call
    ``$monai_histodiff.engines.check_settings`` in their self-contained configs (with ``monai_histodiff.engines``
    among their imports): the engines package re-exports the same objects."""
    import monai_histodiff.bundle as bundle
    import monai_histodiff.engines as engines

    for name in ("check_settings", "SETTING_RULES", "InvalidSettingError", "SettingRule"):
        assert getattr(engines, name) is getattr(bundle, name), name
