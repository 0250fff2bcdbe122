"""What the adaptation stages read from the pre-trained autoencoder checkpoint: its tile size, checked."""

from __future__ import annotations

import pytest
import torch

from monai_histodiff.engines import check_image_size, trained_image_size
from monai_histodiff.handlers import checkpoint_meta, save_checkpoint


def _autoencoder_ckpt(path, config):
    return save_checkpoint(path, {"autoencoder": torch.nn.Linear(2, 2)}, checkpoint_meta("pretrain_autoencoder",
                                                                                         config=config))


def test_trained_image_size_and_its_check(tmp_path):
    ckpt = _autoencoder_ckpt(tmp_path / "autoencoder.pt", {"image_size": 96})
    assert trained_image_size(ckpt) == 96
    check_image_size(ckpt, 96)
    with pytest.raises(ValueError, match=r"image_size=64 but .*autoencoder.pt was pre-trained at image_size=96"):
        check_image_size(ckpt, 64)


def test_a_file_without_a_size_or_of_another_stage_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"old\.pt records no image_size"):
        trained_image_size(_autoencoder_ckpt(tmp_path / "old.pt", {}))
    other = save_checkpoint(tmp_path / "diffusion.pt", {"unet": torch.nn.Linear(2, 2)},
                            checkpoint_meta("pretrain_diffusion", config={"image_size": 64}))
    with pytest.raises(Exception, match="pretrain_autoencoder"):
        trained_image_size(other)


def test_a_classifier_of_another_split_is_refused(tmp_path):
    """A stage reading split.json refuses a classifier trained on another split (e.g. one redrawn after the file was
    deleted), naming both files; a classifier trained on a datalist (no split recorded) is not checked."""
    from monai_histodiff.engines import check_split
    from monai_histodiff.handlers import CheckpointMismatchError

    split = tmp_path / "split.json"
    split.write_text('{"classes": ["a", "b"], "training": [{"image": "x.png", "label": 0}]}')
    clf = save_checkpoint(tmp_path / "aux_classifier.pt", {"classifier": torch.nn.Linear(2, 2)},
                          checkpoint_meta("train_aux_classifier", parents={"split": split}))
    check_split(clf, split)
    split.write_text('{"classes": ["a", "b"], "training": [{"image": "y.png", "label": 1}]}')  # a second draw
    with pytest.raises(CheckpointMismatchError, match=r"aux_classifier.pt was built on split .*split.json"):
        check_split(clf, split)
    other = save_checkpoint(tmp_path / "judge.pt", {"classifier": torch.nn.Linear(2, 2)},
                            checkpoint_meta("train_downstream", parents={"datalist": split}))
    check_split(other, split)
