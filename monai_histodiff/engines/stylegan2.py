"""
The class-conditional StyleGAN2 baseline's engines: training (``bundles/train_stylegan2.json``), the per-class sample
grid watched during training, and tile generation (``bundles/generate_stylegan2.json``).

The baseline is the comparison system of the paper's Table 1 (Xue et al. 2021): :class:`StyleGAN2Trainer` trains
:class:`~monai_histodiff.networks.stylegan2.ConditionalStyleGAN2Generator` and
:class:`~monai_histodiff.networks.stylegan2.ConditionalStyleGAN2Discriminator` on the same labeled training tiles
HistoDiffusion adapts to, and :class:`GanTileGenerator` writes its tiles with the folder layout, manifest, per-tile
seeds, resume and locking of HistoDiffusion's generation stage
(:class:`~monai_histodiff.engines.generation.TileGenerator` is shared), so that the ``select``, ``train_downstream``
and ``evaluate`` stages read both the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from monai.utils import min_version, optional_import

from monai_histodiff.engines.generation import TileGenerator
from monai_histodiff.engines.steps import autocast, grad_scaler, optimizer_step
from monai_histodiff.handlers.nan_guard import check_finite
from monai_histodiff.engines.distributed import unwrap_model
from monai_histodiff.networks.stylegan2 import (
    NOISE_MODES,
    diff_augment,
    discriminator_nonsaturating_loss,
    generator_nonsaturating_loss,
    r1_penalty,
)

Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["StyleGAN2Trainer", "ClassGridSampler", "GanTileGenerator"]


class StyleGAN2Trainer(Trainer):
    """
    Train a class-conditional StyleGAN2 (Karras et al. 2020, in the StyleGAN2-ADA configuration) with DiffAugment
    (Zhao et al. 2020) on labeled tiles: per iteration one discriminator step, then one generator step.

    * Discriminator: ``softplus(D(aug(G(z, y)), y)) + softplus(-D(aug(x), y))`` averaged over the batch
      (:func:`~monai_histodiff.networks.stylegan2.discriminator_nonsaturating_loss`), with the fakes drawn for the
      batch's own labels ``y`` and :func:`~monai_histodiff.networks.stylegan2.diff_augment` (``augment_policy``,
      independent draws) applied to real and fake images alike. Lazy R1 regularisation: on iterations
      ``1, 1 + r1_interval, 1 + 2 r1_interval, ...`` the real images' gradient penalty
      (:func:`~monai_histodiff.networks.stylegan2.r1_penalty`, taken through the augmentation) is added with weight
      ``r1_gamma / 2 * r1_interval``, so that its average weight is StyleGAN2's ``gamma / 2``. The penalty is added to
      the same step's loss rather than taken in a step of its own (StyleGAN2's separate "Dreg" phase, which also
      rescales Adam's hyper-parameters by ``interval / (interval + 1)``); the average gradient is the same.
    * Generator: ``softplus(-D(aug(G(z, y)), y))``
      (:func:`~monai_histodiff.networks.stylegan2.generator_nonsaturating_loss`), with ``update_emas=True`` so that
      the mapping network's per-class running mean of ``w`` (the truncation centre) follows training. The
      discriminator's parameters do not accumulate gradients in this step.

    ``ema`` (an ignite ``EMAHandler``, e.g. :class:`~monai_histodiff.handlers.WarmupEMAHandler` on the generator) is
    attached to the trainer before ``train_handlers``, so that at every iteration the EMA is updated before any
    checkpoint handler saves it; its ``ema_model`` is the generator to sample from. Use
    ``handle_buffers="copy"`` (the default) so that the EMA generator shares the trained generator's ``w_avg``.

    The latents ``z`` are standard normal draws of the global torch RNG on ``device`` (seed it with
    ``monai.utils.set_determinism``). Under ``amp`` the forward passes run under ``torch.autocast`` with one
    ``GradScaler`` per network, and the R1 pass runs in float32 (a gradient penalty under a loss scale would need
    unscaling).

    The output of an iteration is ``{"loss_g", "loss_d", "r1", "d_real", "d_fake", "lr"}`` as floats: the two losses
    (``loss_d`` without the R1 term), the last R1 penalty computed (unweighted; 0.0 before the first), the mean
    discriminator logits of the step's augmented real and fake images, and the generator's learning rate. A
    non-finite loss raises ``FloatingPointError`` before any weight is updated.

    Args:
        device: device of the run.
        max_epochs: epochs to train.
        train_data_loader: batches of ``{"image": [B, 3, H, W] in [-1, 1], "label": [B] class indices}``.
        generator: a :class:`~monai_histodiff.networks.stylegan2.ConditionalStyleGAN2Generator` (possibly
            DDP-wrapped).
        discriminator: a :class:`~monai_histodiff.networks.stylegan2.ConditionalStyleGAN2Discriminator` (possibly
            DDP-wrapped).
        g_optimizer: optimizer of the generator.
        d_optimizer: optimizer of the discriminator.
        r1_gamma: R1 weight ``gamma`` (0: no R1). StyleGAN2-ADA uses ~0.0002 * resolution^2 / batch size.
        r1_interval: iterations between R1 penalties (lazy regularisation; StyleGAN2: 16).
        augment_policy: the DiffAugment operations, comma-separated (``""``: none).
        ema: EMA handler of the generator, attached by the trainer (do not also list it in ``train_handlers``).
        epoch_length: iterations per epoch (default: the loader's length).
        train_handlers: ignite handlers (stats, checkpoints, grids...).
        amp: mixed precision on CUDA (autocast + GradScaler).
        prepare_batch: MONAI prepare-batch callable returning ``(image, label)``.

    Example::

        G = ConditionalStyleGAN2Generator(image_size=64, num_classes=9, channel_base=8192, channel_max=256)
        D = ConditionalStyleGAN2Discriminator(image_size=64, num_classes=9, channel_base=8192, channel_max=256)
        trainer = StyleGAN2Trainer(
            device="cuda", max_epochs=100, train_data_loader=loader, generator=G, discriminator=D,
            g_optimizer=torch.optim.Adam(G.parameters(), 2e-3, betas=(0.0, 0.99)),
            d_optimizer=torch.optim.Adam(D.parameters(), 2e-3, betas=(0.0, 0.99)),
            ema=WarmupEMAHandler(G, momentum=2e-3),
        )
        trainer.run()
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        generator: torch.nn.Module,
        discriminator: torch.nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        r1_gamma: float = 1.0,
        r1_interval: int = 16,
        augment_policy: str = "color,translation,cutout",
        ema: Any = None,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        prepare_batch: Callable = default_prepare_batch,
    ) -> None:
        if not r1_gamma >= 0:
            raise ValueError(f"r1_gamma must be >= 0, got {r1_gamma}.")
        if isinstance(r1_interval, bool) or not isinstance(r1_interval, int) or r1_interval < 1:
            raise ValueError(f"r1_interval must be an integer >= 1, got {r1_interval!r}.")
        diff_augment(torch.zeros(1, 1, 8, 8), augment_policy)  # refuses an unknown operation now, not mid-run
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            prepare_batch=prepare_batch,
            handlers=None,
            amp=amp,
            decollate=False,
        )
        self.generator = generator
        self.discriminator = discriminator
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.r1_gamma = float(r1_gamma)
        self.r1_interval = int(r1_interval)
        self.augment_policy = augment_policy
        self.ema = ema
        self.d_scaler = grad_scaler(self.amp)
        self._last_r1 = 0.0
        if ema is not None:
            ema.attach(self)
        handlers = [h for h in (train_handlers or []) if h is not ema]
        if handlers:
            self._register_handlers(handlers)

    def _autocast(self, enabled: bool = True):
        return autocast(self.state.device, self.amp and enabled)

    def _latents(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.randn(batch_size, unwrap_model(self.generator).z_dim, device=device)

    def r1_due(self, iteration: int) -> bool:
        """Whether iteration ``iteration`` (1-based) adds the R1 penalty: every ``r1_interval``-th from the first."""
        return self.r1_gamma > 0 and (iteration - 1) % self.r1_interval == 0

    def _iteration(self, engine: Engine, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        x, labels = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        if labels is None:
            raise ValueError("StyleGAN2Trainer needs class labels: batches must hold a 'label' entry.")
        labels = torch.as_tensor(labels, device=x.device).long().reshape(-1)
        x = x.float()
        batch, iteration = x.shape[0], engine.state.iteration
        G, D = self.generator, self.discriminator
        G.train()
        D.train()

        # discriminator step: real vs detached fakes of the same labels, both augmented; lazy R1 on the reals
        D.requires_grad_(True)
        with torch.no_grad(), self._autocast():
            fake = G(self._latents(batch, x.device), labels)
        with self._autocast():
            fake_logits = D(diff_augment(fake.float(), self.augment_policy), labels).float()
        r1_now = self.r1_due(iteration)
        real = x.detach().requires_grad_(r1_now)
        with self._autocast(enabled=not r1_now):
            real_logits = D(diff_augment(real, self.augment_policy), labels).float()
        loss_d = discriminator_nonsaturating_loss(real_logits, fake_logits)
        terms = {"loss_d": loss_d}
        total_d = loss_d
        if r1_now:
            r1 = r1_penalty(real_logits, real)
            terms["r1"] = r1
            total_d = loss_d + r1 * (self.r1_gamma / 2.0 * self.r1_interval)
        check_finite(terms, "train_stylegan2", iteration)
        optimizer_step(total_d, self.d_optimizer, self.d_scaler)
        if r1_now:
            self._last_r1 = float(terms["r1"].detach())

        # generator step: fakes through the (frozen) discriminator; updates the per-class running mean of w
        D.requires_grad_(False)
        try:
            with self._autocast():
                fake = G(self._latents(batch, x.device), labels, update_emas=True)
                g_logits = D(diff_augment(fake.float(), self.augment_policy), labels).float()
            loss_g = generator_nonsaturating_loss(g_logits)
            check_finite({"loss_g": loss_g}, "train_stylegan2", iteration)
            optimizer_step(loss_g, self.g_optimizer, engine.scaler)
        finally:
            D.requires_grad_(True)

        return {
            "loss_g": float(loss_g.detach()),
            "loss_d": float(loss_d.detach()),
            "r1": self._last_r1,
            "d_real": float(real_logits.detach().mean()),
            "d_fake": float(fake_logits.detach().mean()),
            "lr": self.g_optimizer.param_groups[0]["lr"],
        }


class ClassGridSampler:
    """
    Callable drawing one row of tiles per class from the (EMA) generator, for
    :class:`~monai_histodiff.handlers.SampleGridHandler`: the same ``num_per_class`` latents in every row (a column
    shows one ``z`` under each class) and the constant noise inputs, so successive grids show the same draws from a
    better model.

    Args:
        generator: the generator, or a callable returning it (e.g. ``lambda: ema.ema_model``).
        num_classes: number of classes (rows).
        num_per_class: tiles per row.
        truncation_psi: truncation towards each class's mean ``w``.
        device: device to sample on.
        seed: seed of the latents.
    """

    def __init__(self, generator: torch.nn.Module | Callable[[], torch.nn.Module], num_classes: int,
                 num_per_class: int = 8, truncation_psi: float = 1.0, device: str | torch.device = "cpu",
                 seed: int = 0) -> None:
        self.generator = generator
        self.num_classes = int(num_classes)
        self.num_per_class = int(num_per_class)
        self.truncation_psi = float(truncation_psi)
        self.device = torch.device(device)
        self.seed = int(seed)

    @torch.no_grad()
    def __call__(self) -> list[torch.Tensor]:
        """One ``[num_per_class, 3, H, W]`` batch in ``[-1, 1]`` per class, in class order."""
        model = self.generator if isinstance(self.generator, torch.nn.Module) else self.generator()
        model = unwrap_model(model)
        was_training = model.training
        model.eval()
        z = torch.randn(self.num_per_class, model.z_dim, generator=torch.Generator().manual_seed(self.seed))
        z = z.to(self.device)
        rows = []
        for c in range(self.num_classes):
            labels = torch.full((self.num_per_class,), c, dtype=torch.long, device=self.device)
            rows.append(model(z, labels, truncation_psi=self.truncation_psi, noise_mode="const").float().clamp(-1, 1))
        model.train(was_training)
        return rows


class GanTileGenerator(TileGenerator):
    """
    Generate ``counts[c]`` tiles per class with a trained class-conditional StyleGAN2 generator: the GAN baseline's
    synthesis stage, with the output folder, manifest, per-tile seeds, sharding, resume, lock and grids of
    HistoDiffusion's :class:`~monai_histodiff.engines.generation.GuidedTileGenerator` (see
    :class:`~monai_histodiff.engines.generation.TileGenerator`), so that ``bundles/select.json`` reads the folder as
    it reads HistoDiffusion's.

    Tile ``index`` of class ``c`` draws its latent ``z`` and then its per-layer noise inputs (``noise_mode="random"``)
    from its own CPU generator seeded with :func:`~monai_histodiff.engines.generation.tile_seed` ``(seed, c, index)``
    (the generator accepts one ``torch.Generator`` per sample), so a tile is the same made alone or in any batch, up
    to the networks' floating-point behaviour for different batch sizes.

    Manifest rows have every field of :data:`~monai_histodiff.data.manifest.MANIFEST_FIELDS`; those of the
    diffusion sampler (``guidance_scale``, ``guidance_window``, ``steps``, ``scheduler``, ``eta``) and ``confidence``
    (there is no classifier) are ``null``, and two more fields record ``truncation_psi`` and ``noise_mode``.

    Args:
        generator: the trained generator (e.g. from
            :func:`~monai_histodiff.engines.loading.load_stylegan2_generator`, EMA weights).
        class_names: class names in label-index order (the generator's classes).
        counts: tiles to generate per class, ``{name: count}`` (missing names: 0) or one count per class.
        output_dir: the output folder.
        truncation_psi: truncation towards each class's mean ``w`` (1: none).
        noise_mode: ``'random'`` (per-tile noise), ``'const'`` or ``'none'``.
        batch_size: tiles per batch.
        seed: base seed of :func:`~monai_histodiff.engines.generation.tile_seed`.
        device: device to generate on; CUDA when available if None.
        amp: run the generator under autocast.
        checkpoint_hashes: hashes of the checkpoints used, recorded in every row.
        rank: this process's shard; from ``torch.distributed`` (else 0) when None.
        world_size: number of shards; from ``torch.distributed`` (else 1) when None.
        progress: show a tqdm progress bar over this rank's tiles.
        grid_size: number of tiles in each class's sample grid (0: no grids).
        background_writer: write each batch's tiles and manifest rows in a background thread while the next batch
            is sampled (see :class:`~monai_histodiff.engines.generation.TileGenerator`).
    """

    stage = "generate_stylegan2"

    def __init__(
        self,
        *,
        generator: torch.nn.Module,
        class_names: Sequence[str],
        counts: Mapping[str, int] | Sequence[int],
        output_dir: str,
        truncation_psi: float = 1.0,
        noise_mode: str = "random",
        batch_size: int = 16,
        seed: int = 0,
        device: str | torch.device | None = None,
        amp: bool = False,
        checkpoint_hashes: Mapping[str, str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        progress: bool = True,
        grid_size: int = 16,
        background_writer: bool = True,
    ) -> None:
        super().__init__(
            class_names=class_names,
            counts=counts,
            output_dir=output_dir,
            batch_size=batch_size,
            seed=seed,
            device=device,
            checkpoint_hashes=checkpoint_hashes,
            rank=rank,
            world_size=world_size,
            progress=progress,
            grid_size=grid_size,
            background_writer=background_writer,
        )
        net = unwrap_model(generator)
        num_classes = getattr(net, "num_classes", None)
        if num_classes is not None and num_classes != len(self.class_names):
            raise ValueError(f"the generator has {num_classes} classes but {len(self.class_names)} class names were "
                             f"given ({self.class_names}).")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}.")
        self.generator = generator
        self.truncation_psi = float(truncation_psi)
        self.noise_mode = noise_mode
        self.amp = bool(amp)

    def _settings(self) -> dict[str, Any]:
        return {
            "guidance_scale": None,
            "guidance_window": None,
            "steps": None,
            "scheduler": None,
            "eta": None,
            "truncation_psi": self.truncation_psi,
            "noise_mode": self.noise_mode,
            "checkpoint_hashes": self.checkpoint_hashes,
        }

    def _models(self) -> Sequence[torch.nn.Module]:
        return (self.generator,)

    @torch.no_grad()
    def generate_batch(self, pairs: Sequence[tuple[int, int]], context: Any = None) -> tuple[torch.Tensor, None]:
        """
        Make the tiles ``pairs`` (``(class_index, index)``) in one batch.

        Returns:
            the tiles ``[B, 3, H, W]`` clamped to ``[-1, 1]`` (on CPU, float32), and None (no confidence).
        """
        net = unwrap_model(self.generator)
        generators = [self.tile_generator(c, i) for c, i in pairs]
        z = torch.stack([torch.randn(net.z_dim, generator=g) for g in generators]).to(self.device)
        labels = torch.tensor([c for c, _ in pairs], dtype=torch.long, device=self.device)
        with torch.autocast(device_type=self.device.type, enabled=self.amp):
            images = net(z, labels, truncation_psi=self.truncation_psi, noise_mode=self.noise_mode,
                         generator=generators)
        return images.float().clamp(-1, 1).cpu(), None
