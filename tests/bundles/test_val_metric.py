"""The classifier stages' ``val_acc`` (model selection) is top-1 accuracy, not MONAI's per-class confusion accuracy."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser
from monai.engines import SupervisedEvaluator
from monai.handlers import ConfusionMatrix

from monai_histodiff.bundle.configs import config_files

# 4 tiles, 3 classes: labels 0 1 2 0, argmax 0 2 2 1 -> top-1 = 2/4, while the per-class (TP + TN) / all accuracies
# are 3/4, 2/4, 3/4 (mean 2/3)
LOGITS = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.5, 0.0, 4.0], [1.0, 2.0, 0.0]])
LABELS = torch.tensor([0, 1, 2, 0])  # decollated to Python ints, as a DataLoader batch of int labels is


def _evaluate(metric) -> float:
    batches = [{"image": LOGITS[:3], "label": LABELS[:3]}, {"image": LOGITS[3:], "label": LABELS[3:]}]
    evaluator = SupervisedEvaluator(device="cpu", val_data_loader=batches, network=torch.nn.Identity(),
                                    key_val_metric={"val_acc": metric})
    evaluator.run()
    return float(evaluator.state.metrics["val_acc"])


@pytest.mark.parametrize("stage", ["train_aux_classifier", "train_downstream"])
def test_val_acc_is_top1(stage):
    parser = ConfigParser()
    parser.read_config(config_files(stage))
    assert _evaluate(parser.get_parsed_content("validate#key_metric")["val_acc"]) == pytest.approx(0.5)


def test_confusion_matrix_accuracy_is_not_top1():
    """Why the bundles do not use it: on the same batch MONAI's "accuracy" averages per-class (TP + TN) / all."""
    from monai.transforms import AsDiscrete

    onehot = AsDiscrete(to_onehot=3)
    metric = ConfusionMatrix(metric_name="accuracy", output_transform=lambda out: (
        [onehot(o["pred"].argmax(0, keepdim=True)) for o in out], [onehot(torch.tensor([o["label"]])) for o in out]))
    assert _evaluate(metric) == pytest.approx(2 / 3)
