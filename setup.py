"""Install script for ``monai-histodiff``, a MONAI plugin implementing HistoDiffusion (MICCAI 2023)."""

from __future__ import annotations

from setuptools import find_packages, setup

setup(
    name="monai-histodiff",
    version="0.1.0",
    description="HistoDiffusion: synthetic augmentation with large-scale unconditional latent-diffusion pre-training, "
    "as a MONAI plugin",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # the stage configs of bundles/ are installed inside the package (monai_histodiff/bundles/), so stages run from an
    # installed package and any working directory (monai_histodiff.bundle.configs finds them in either place)
    packages=[*find_packages(include=["monai_histodiff", "monai_histodiff.*"]), "monai_histodiff.bundles"],
    package_dir={"monai_histodiff.bundles": "bundles"},
    package_data={"monai_histodiff.bundle": ["resources/*.json"], "monai_histodiff.bundles": ["*.json", "*.conf"]},
    install_requires=[
        "monai>=1.6,<1.7",
        "torch>=2.8",
        "pytorch-ignite>=0.5",
        "nibabel",
        "scikit-image",
        "tensorboard",
        "einops",
        "scipy",
        "pillow",
        "fire",
        "pyyaml",
        "tqdm",
        "jsonschema",
        "requests",
        "matplotlib",
        # whole-slide images (monai_histodiff.data.slides): tifffile-based reader, JPEG / JPEG 2000 tile codecs
        "tiffslide",
        "imagecodecs",
    ],
    extras_require={
        "itk": ["itk>=5.3"],
        "openslide": ["openslide-python", "openslide-bin"],
        "test": ["pytest>=7", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["monai-histodiff=monai_histodiff.__main__:main"]},
)
