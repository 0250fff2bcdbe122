"""Build networks from the self-describing checkpoints of earlier stages, checking that they belong together.

Every checkpoint stores the constructor arguments of its network (``meta["config"]``) and the sha256 of the
checkpoints it was built on (``meta["parents"]``). Later stages and other sites rebuild networks from those, never
from retyped settings, and a mismatched pair (a diffusion model with another autoencoder, a fine-tuned decoder of
another autoencoder) is a clear error naming both files. Checkpoints are read with ``weights_only=True``
(:func:`~monai_histodiff.handlers.load_checkpoint`): one that would run code on load is refused, naming the file and
the loader.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from monai_histodiff.engines.distributed import unwrap_model
from monai_histodiff.handlers.checkpoint import load_checkpoint, verify_parent

__all__ = [
    "load_autoencoder",
    "load_diffusion",
    "load_image_classifier",
    "load_latent_classifier",
    "load_tile_classifier",
    "load_feature_extractor",
    "load_stylegan2_generator",
    "scheduler_from_meta",
    "diffusion_meta",
    "checkpoint_classes",
    "check_classes",
    "check_image_size",
    "check_split",
    "trained_image_size",
    "latent_shape_of",
    "require_single_process",
]


def load_autoencoder(path: str | os.PathLike, decoder_path: str | os.PathLike | None = None,
                     device: str | torch.device = "cpu") -> AutoencoderKL:
    """The pre-trained ``AutoencoderKL``; with ``decoder_path``, its decoder replaced by the fine-tuned D'.

    The fine-tuned decoder checkpoint must have been made from this very autoencoder (checked by hash).
    """
    ckpt = load_checkpoint(path, stage="pretrain_autoencoder", reader="load_autoencoder")
    model = AutoencoderKL(**ckpt["meta"]["config"]["autoencoder_args"])
    model.load_state_dict(ckpt["state"]["autoencoder"])
    if decoder_path is not None:
        dec = load_checkpoint(decoder_path, stage="finetune", reader="load_autoencoder (fine-tuned decoder)")
        verify_parent(dec, "autoencoder", path)
        missing = set(dec["state"]["decoder"]) - set(model.state_dict())
        if missing:
            raise ValueError(f"{decoder_path} holds weights {sorted(missing)[:3]}... that {path} does not have")
        model.load_state_dict(dec["state"]["decoder"], strict=False)
    return model.to(device).eval()


def load_diffusion(path: str | os.PathLike, autoencoder_path: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu", use_ema: bool = True) -> tuple[DiffusionModelUNet, dict[str, Any]]:
    """The pre-trained diffusion UNet (EMA weights when stored and ``use_ema``) and its checkpoint ``meta``.

    ``meta`` holds ``scale_factor``, ``latent_shape`` and ``config["scheduler_args"]``. With ``autoencoder_path``
    the diffusion model is checked to have been trained on that autoencoder's latents. Loading EMA weights warns when
    the EMA still holds over 10% of its random initialisation (``meta["ema"]``, or estimated for older checkpoints).
    """
    ckpt = _diffusion_checkpoint(path, "load_diffusion")
    if autoencoder_path is not None:
        verify_parent(ckpt, "autoencoder", autoencoder_path)
    model = _load_weights(DiffusionModelUNet(**ckpt["meta"]["config"]["diffusion_args"]), ckpt, "diffusion", path,
                          use_ema)
    return model.to(device).eval(), ckpt["meta"]


#: stages whose checkpoints hold a diffusion UNet: the unconditional pre-trained one and its class-conditional
#: fine-tuning (stage ``finetune_conditional``, sampled with classifier-free guidance)
DIFFUSION_STAGES = ("pretrain_diffusion", "finetune_conditional")


def _diffusion_checkpoint(path: str | os.PathLike, reader: str) -> dict[str, Any]:
    """A checkpoint of one of :data:`DIFFUSION_STAGES`, with an error naming the file and the stage otherwise."""
    expected = " or ".join(f"'{s}'" for s in DIFFUSION_STAGES)
    ckpt = load_checkpoint(path, reader=f"{reader}, expecting the output of stage {expected}",
                           remedy=f"delete it and rerun the stage that writes it ({expected})")
    if ckpt["meta"].get("stage") not in DIFFUSION_STAGES:
        raise ValueError(f"{path} was written by stage '{ckpt['meta'].get('stage')}', expected a diffusion model "
                         f"(stage {expected})")
    return ckpt


def _load_weights(model: torch.nn.Module, ckpt: dict[str, Any], name: str, path: str | os.PathLike,
                  use_ema: bool) -> torch.nn.Module:
    """Load a checkpoint's EMA weights into ``model`` when stored and ``use_ema`` (warning when that EMA still holds
    over 10% of its random initialisation), else its trained weights ``state[name]``."""
    state = ckpt["state"]
    if use_ema and "ema" in state:
        from monai_histodiff.handlers.ema import ema_summary_from_checkpoint, warn_if_unconverged

        warn_if_unconverged(ema_summary_from_checkpoint(ckpt), str(path))
        model.load_state_dict(state["ema"])
    else:
        model.load_state_dict(state[name])
    return model


def _check_trained_size(trained: Any, image_size: int, path: str | os.PathLike, what: str) -> None:
    """Raise, naming ``path``, when ``image_size`` differs from the tile size ``trained`` the file was made at."""
    if trained is not None and int(trained) != int(image_size):
        raise ValueError(f"image_size={image_size} but {path} was {what} at image_size={trained}: use the same size "
                         f"(bundles/small.json for the small checkpoints, none for paper scale)")


def diffusion_meta(path: str | os.PathLike, autoencoder_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``meta`` of a diffusion checkpoint (scale factor, scheduler settings, latent shape) without building the
    UNet; checked against ``autoencoder_path`` when given."""
    ckpt = _diffusion_checkpoint(path, "diffusion_meta")
    if autoencoder_path is not None:
        verify_parent(ckpt, "autoencoder", autoencoder_path)
    return ckpt["meta"]


def scheduler_from_meta(meta: dict[str, Any], kind: str = "ddim", num_inference_steps: int | None = None):
    """The noise scheduler a diffusion checkpoint was trained with (same betas), as DDPM or DDIM for sampling."""
    args = dict(meta["config"]["scheduler_args"])
    if kind == "ddpm":
        scheduler = DDPMScheduler(**args)
    elif kind == "ddim":
        args.pop("variance_type", None)
        scheduler = DDIMScheduler(**args)
    else:
        raise ValueError(f"scheduler kind must be 'ddpm' or 'ddim', got {kind!r}")
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    return scheduler


def load_image_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The auxiliary image classifier phi (a ``HistoImageClassifier``) of stage ``train_aux_classifier``."""
    from monai_histodiff.networks import HistoImageClassifier

    ckpt = load_checkpoint(path, stage="train_aux_classifier", reader="load_image_classifier")
    model = HistoImageClassifier(**ckpt["meta"]["config"]["network_args"])
    model.load_state_dict(ckpt["state"]["classifier"])
    return model.to(device).eval()


def load_latent_classifier(path: str | os.PathLike, diffusion_path: str | os.PathLike | None = None,
                           device: str | torch.device = "cpu") -> torch.nn.Module:
    """The time-dependent latent classifier phi_latent(z_t, t); checked against the diffusion checkpoint if given."""
    from monai_histodiff.networks import TimeConditionedLatentClassifier

    ckpt = load_checkpoint(path, stage="train_latent_classifier", reader="load_latent_classifier")
    if diffusion_path is not None:
        verify_parent(ckpt, "diffusion", diffusion_path)
    model = TimeConditionedLatentClassifier(**ckpt["meta"]["config"]["network_args"])
    model.load_state_dict(ckpt["state"]["classifier"])
    return model.to(device).eval()


def load_tile_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The downstream tissue classifier (a ``TileClassifier``) of stage ``train_downstream``."""
    from monai_histodiff.networks import TileClassifier

    ckpt = load_checkpoint(path, stage="train_downstream", reader="load_tile_classifier")
    model = TileClassifier(**ckpt["meta"]["config"]["network_args"])
    model.load_state_dict(ckpt["state"]["classifier"])
    return model.to(device).eval()


def load_feature_extractor(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A classifier trained on real labeled tiles, as a feature extractor (its ``features(x)``): the auxiliary
    classifier or the downstream baseline, whichever stage wrote ``path``."""
    stage = load_checkpoint(path, reader="load_feature_extractor")["meta"].get("stage")
    if stage == "train_aux_classifier":
        return load_image_classifier(path, device)
    if stage == "train_downstream":
        return load_tile_classifier(path, device)
    raise ValueError(f"{path} (stage '{stage}') is not a classifier checkpoint: give the auxiliary classifier or the "
                     f"downstream baseline")


def load_stylegan2_generator(path: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True,
                             image_size: int | None = None) -> torch.nn.Module:
    """The class-conditional StyleGAN2 generator of stage ``train_stylegan2`` (the GAN baseline), rebuilt from the
    checkpoint's ``meta["config"]["generator_args"]``: its EMA weights when stored and ``use_ema`` (warning when that
    EMA still holds over 10% of its random initialisation), else the trained weights. With ``image_size``, a generator
    trained at another tile size is refused, naming the file."""
    from monai_histodiff.networks.stylegan2 import ConditionalStyleGAN2Generator

    ckpt = load_checkpoint(path, stage="train_stylegan2", reader="load_stylegan2_generator")
    args = ckpt["meta"]["config"]["generator_args"]
    if image_size is not None:
        _check_trained_size(args["image_size"], image_size, path, "trained")
    model = _load_weights(ConditionalStyleGAN2Generator(**args), ckpt, "generator", path, use_ema)
    return model.to(device).eval()


def checkpoint_classes(path: str | os.PathLike) -> list[str]:
    """Class names recorded in a checkpoint."""
    classes = load_checkpoint(path, reader="checkpoint_classes")["meta"].get("classes")
    if not classes:
        raise ValueError(f"{path} records no class names")
    return list(classes)


def check_classes(checkpoint_classes: list[str], split_classes: list[str], checkpoint_path: str | os.PathLike,
                  split_path: str | os.PathLike) -> None:
    """Raise naming both files when a checkpoint's class names differ from the split's (order included)."""
    if list(checkpoint_classes) != list(split_classes):
        raise ValueError(f"{checkpoint_path} was trained on classes {list(checkpoint_classes)} but {split_path} has "
                         f"{list(split_classes)}: retrain the classifier on this split or use the matching split")


def trained_image_size(autoencoder_path: str | os.PathLike) -> int:
    """The tile size the autoencoder in ``autoencoder_path`` was pre-trained at: the adaptation stages read their
    ``image_size`` from it, so a site does not repeat the pre-training size on every stage.

    Raises:
        ValueError: naming the file when it records no tile size.
    """
    meta = load_checkpoint(autoencoder_path, stage="pretrain_autoencoder", reader="trained_image_size")["meta"]
    size = meta.get("config", {}).get("image_size")
    if size is None:
        raise ValueError(f"{autoencoder_path} records no image_size (meta['config']); pass --image_size explicitly")
    return int(size)


def check_split(checkpoint_path: str | os.PathLike, split_file: str | os.PathLike) -> None:
    """Raise :class:`~monai_histodiff.handlers.CheckpointMismatchError`, naming both files, when the checkpoint was
    trained on another ``split.json`` than ``split_file`` (by sha256), so that a stage cannot mix a classifier trained
    on one split with the real tiles of another (e.g. a split redrawn after the file was deleted or moved). A
    checkpoint that records no split (one trained on a datalist) is not checked."""
    ckpt = load_checkpoint(checkpoint_path, reader="check_split")
    if "split" in ckpt["meta"].get("parents", {}):
        verify_parent(ckpt, "split", split_file)


def check_image_size(autoencoder_path: str | os.PathLike, image_size: int) -> None:
    """Raise when ``image_size`` differs from the tile size the autoencoder was pre-trained at: the diffusion model,
    the latent classifier and generation all assume that latent size."""
    meta = load_checkpoint(autoencoder_path, stage="pretrain_autoencoder", reader="check_image_size")["meta"]
    _check_trained_size(meta["config"].get("image_size"), image_size, autoencoder_path, "pre-trained")


def latent_shape_of(autoencoder: torch.nn.Module, image_size: int) -> list[int]:
    """``[C, h, w]`` of the latents ``autoencoder`` makes from ``image_size`` tiles (f read from the network)."""
    ae = unwrap_model(autoencoder)
    device = next(ae.parameters()).device
    with torch.no_grad():
        z_mu, _ = ae.encode(torch.zeros(1, 3, image_size, image_size, device=device))
    return list(z_mu.shape[1:])


def require_single_process(distributed: bool, stage: str) -> None:
    """Refuse ``distributed: true`` for a stage that runs in one process."""
    if distributed:
        raise ValueError(f"stage '{stage}' runs in a single process: drop bundles/multi_gpu.json for it")
