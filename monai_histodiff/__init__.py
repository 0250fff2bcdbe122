"""monai_histodiff: HistoDiffusion (Ye et al., MICCAI 2023) as a MONAI plugin.

Pre-train a latent diffusion model on unlabeled histology, adapt it at a new site to a small labeled set, generate
class-conditioned synthetic tiles with latent classifier guidance, keep the trustworthy ones and train a better
tissue classifier. The components below are what MONAI bundle configs reach by ``_target_``; the sub-packages hold
the rest: ``data``, ``networks``, ``schedulers``, ``inferers``, ``engines``, ``handlers``, ``selection``, ``metrics``,
``bundle`` (finding, checking, exporting and publishing the stage configs) and ``apps`` (the workflows over the
stages: the experiment runner, the demo, running one stage). ``errors`` is the one-line error of a failed stage or
command, installed here for every bundle run.
"""

from __future__ import annotations

__version__ = "0.1.0"

from monai_histodiff.errors import install_excepthook  # noqa: E402

install_excepthook()  # a bundle run's last line is the project's own error message (monai_histodiff.errors)

from monai_histodiff.data.transforms import tile_transforms  # noqa: E402
from monai_histodiff.handlers.selection import CentroidSelectionHandler  # noqa: E402
from monai_histodiff.inferers.guided import ClassifierGuidedLatentDiffusionInferer  # noqa: E402
from monai_histodiff.networks import HistoImageClassifier, TileClassifier, TimeConditionedLatentClassifier  # noqa: E402
from monai_histodiff.schedulers import RespacedDDIMScheduler, RespacedDDPMScheduler  # noqa: E402

__all__ = [
    "__version__",
    "CentroidSelectionHandler",
    "ClassifierGuidedLatentDiffusionInferer",
    "HistoImageClassifier",
    "RespacedDDIMScheduler",
    "RespacedDDPMScheduler",
    "TileClassifier",
    "TimeConditionedLatentClassifier",
    "tile_transforms",
]
