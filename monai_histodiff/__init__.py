"""monai_histodiff: HistoDiffusion (Ye et al., MICCAI 2023) as a MONAI plugin.

Pre-train a latent diffusion model on unlabeled histology, adapt it at a new site to a small labeled set, generate
class-conditioned synthetic tiles with latent classifier guidance, keep the trustworthy ones and train a better
tissue classifier.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
