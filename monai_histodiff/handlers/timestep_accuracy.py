"""Accuracy of the time-dependent latent classifier per diffusion-timestep bucket (HistoDiffusion, Eq. 6)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from monai.config import PathLike
from monai.utils import IgniteInfo, min_version, optional_import

from monai_histodiff.data.atomic import atomic_write

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
Figure, _ = optional_import("matplotlib.figure", name="Figure")
FigureCanvasAgg, _ = optional_import("matplotlib.backends.backend_agg", name="FigureCanvasAgg")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["TimestepBucketAccuracy", "plot_timestep_accuracy"]


def _is_rank0() -> bool:
    from monai_histodiff.engines.distributed import is_main_process  # not at import: engines imports handlers

    return is_main_process()


def _write_json(obj: Any, path: PathLike) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2)))


class TimestepBucketAccuracy:
    """
    Accuracy of a time-dependent latent classifier :math:`\\phi(z_t, t)` as a function of the noise level.

    The latent classifier of HistoDiffusion is trained on noisy latents :math:`z_t \\sim q(z_t | z_0)` (Eq. 6) and
    guides sampling at every timestep (Eq. 7), so a single validation accuracy hides what matters: up to which noise
    level it still knows the class. This helper splits ``[0, T)`` into ``num_buckets`` equal buckets; for bucket ``b``
    (``t`` in ``[b T / B, (b + 1) T / B)``) every validation latent is noised with ``scheduler.add_noise`` at
    ``timesteps_per_bucket`` timesteps drawn uniformly in the bucket, and the accuracy of ``argmax phi(z_t, t)`` over
    these ``N * timesteps_per_bucket`` noisy latents is reported. Timesteps and noise come from a generator seeded with
    ``seed`` at each :meth:`compute`, so successive evaluations (epochs) see the same noisy latents and are comparable.
    With a clean-latent-perfect classifier the accuracy starts near 1 in the lowest bucket and falls to chance
    (``1 / K``) where :math:`z_t` is almost pure noise.

    Use it directly (:meth:`compute`, :meth:`write_json`, :func:`plot_timestep_accuracy`) or as an Ignite handler
    (:meth:`attach`): every ``interval`` epochs it computes the buckets, stores ``engine.state.metrics
    ["acc_t_bucket_<i>"]``, and on rank 0 only writes ``timestep_accuracy.json`` (and ``timestep_accuracy.png``) to
    ``output_dir`` and logs ``val/acc_t<t_min>-<t_max>`` to a TensorBoard ``SummaryWriter``.

    The classifier is evaluated in eval mode under ``no_grad``; its previous train/eval mode is restored afterwards, so
    the handler can be attached to the engine that trains it.

    Args:
        classifier: the latent classifier, called as ``classifier(z_t, timesteps)`` with ``timesteps`` of shape
            ``[B]`` (e.g. :class:`monai_histodiff.networks.TimeConditionedLatentClassifier`), returning logits
            ``[B, K]``.
        scheduler: the diffusion noise scheduler with ``add_noise(z_0, noise, timesteps)``, e.g. MONAI's
            :class:`~monai.networks.schedulers.DDPMScheduler` of the latent diffusion model.
        latents: validation latents ``[N, C, h, w]``; the clean latents are ``z_0 = scale_factor * latents``: pass the
            encoder latents with the LDM's scale factor, or already scaled latents with ``scale_factor=1.0``.
        labels: class indices ``[N]`` (or ``[N, 1]``) of the latents.
        scale_factor: the LDM latent scale factor applied to ``latents``.
        num_buckets: number of equal timestep buckets ``B``; must divide into ``num_train_timesteps`` at least once.
        num_train_timesteps: number of diffusion timesteps ``T``; defaults to the scheduler's.
        timesteps_per_bucket: number of timesteps drawn per latent and bucket.
        seed: seed of the timesteps and noise.
        batch_size: number of latents per classifier call.
        device: device of the evaluation; defaults to the classifier's.
        output_dir: folder of ``timestep_accuracy.json`` / ``.png`` written by the handler; nothing is written if None.
        summary_writer: optional TensorBoard ``SummaryWriter`` (anything with ``add_scalar(tag, value, step)``).
        interval: run the handler every ``interval`` epochs.
        plot: whether the handler also writes ``timestep_accuracy.png``.
        metric_prefix: prefix of the ``engine.state.metrics`` keys.

    Example::

        acc_t = TimestepBucketAccuracy(latent_classifier, scheduler, val_latents, val_labels, scale_factor=0.18,
                                       output_dir="runs/latent_cls", summary_writer=writer)
        acc_t.attach(trainer)  # or: buckets = acc_t.compute(); plot_timestep_accuracy(buckets, "acc_t.png", 1 / 9)
    """

    def __init__(
        self,
        classifier: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        scheduler: Any,
        latents: torch.Tensor,
        labels: torch.Tensor,
        *,
        scale_factor: float = 1.0,
        num_buckets: int = 10,
        num_train_timesteps: int | None = None,
        timesteps_per_bucket: int = 4,
        seed: int = 0,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        output_dir: PathLike | None = None,
        summary_writer: Any = None,
        interval: int = 1,
        plot: bool = True,
        metric_prefix: str = "acc_t_bucket_",
    ) -> None:
        if not callable(getattr(scheduler, "add_noise", None)):
            raise TypeError("scheduler must provide add_noise(original_samples, noise, timesteps).")
        sched_t = getattr(scheduler, "num_train_timesteps", None)
        num_train_timesteps = int(sched_t if num_train_timesteps is None else num_train_timesteps)
        if num_train_timesteps < 1 or (sched_t is not None and num_train_timesteps > int(sched_t)):
            raise ValueError(
                f"num_train_timesteps must be in [1, {sched_t}] (the scheduler's), got {num_train_timesteps}."
            )
        if not 1 <= num_buckets <= num_train_timesteps:
            raise ValueError(f"num_buckets must be in [1, {num_train_timesteps}] (num_train_timesteps), got {num_buckets}.")
        counts = {"timesteps_per_bucket": timesteps_per_bucket, "batch_size": batch_size, "interval": interval}
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value}.")
        latents = torch.as_tensor(latents)
        labels = torch.as_tensor(labels).reshape(-1)
        if latents.ndim < 2 or latents.shape[0] == 0 or latents.shape[0] != labels.shape[0]:
            raise ValueError(
                f"latents [N, C, ...] and labels [N] must be non-empty with the same N, got {tuple(latents.shape)} and "
                f"{tuple(labels.shape)}."
            )
        if labels.is_floating_point():
            raise ValueError("labels must be integer class indices.")

        self.classifier = classifier
        self.scheduler = scheduler
        self.latents = latents.detach()
        self.labels = labels.detach().long()
        self.scale_factor = float(scale_factor)
        self.num_buckets = int(num_buckets)
        self.num_train_timesteps = num_train_timesteps
        self.timesteps_per_bucket = int(timesteps_per_bucket)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.device = None if device is None else torch.device(device)
        self.output_dir = output_dir
        self.summary_writer = summary_writer
        self.interval = int(interval)
        self.plot = plot
        self.metric_prefix = metric_prefix
        self.num_classes: int | None = None
        self.buckets: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []

    def bucket_edges(self) -> list[tuple[int, int]]:
        """Inclusive ``(t_min, t_max)`` of each bucket: bucket ``b`` holds ``t`` in ``[b T // B, (b + 1) T // B)``."""
        T, B = self.num_train_timesteps, self.num_buckets
        return [(b * T // B, (b + 1) * T // B - 1) for b in range(B)]

    def _device(self) -> torch.device:
        if self.device is not None:
            return self.device
        if isinstance(self.classifier, nn.Module):
            param = next(self.classifier.parameters(), None)
            if param is not None:
                return param.device
        return self.latents.device

    @torch.no_grad()
    def compute(self) -> list[dict[str, Any]]:
        """
        Evaluate the classifier in every timestep bucket.

        Returns:
            one dict per bucket, in increasing ``t``: ``bucket`` (index), ``t_min`` and ``t_max`` (inclusive timestep
            range), ``accuracy`` (fraction of correct argmax predictions) and ``n`` (number of noisy latents).
        """
        device = self._device()
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        z0_all = self.latents.float() * self.scale_factor
        was_training = isinstance(self.classifier, nn.Module) and self.classifier.training
        if isinstance(self.classifier, nn.Module):
            self.classifier.eval()
        buckets = []
        try:
            for b, (t_min, t_max) in enumerate(self.bucket_edges()):
                correct, total = 0, 0
                for _ in range(self.timesteps_per_bucket):
                    # drawn for the whole set at once on CPU, so the draws do not depend on batch size or device
                    t_all = torch.randint(t_min, t_max + 1, (len(z0_all),), generator=gen)
                    noise_all = torch.randn(z0_all.shape, generator=gen)
                    for start in range(0, len(z0_all), self.batch_size):
                        sl = slice(start, start + self.batch_size)
                        z0, t = z0_all[sl].to(device), t_all[sl].to(device)
                        z_t = self.scheduler.add_noise(original_samples=z0, noise=noise_all[sl].to(device), timesteps=t)
                        logits = self.classifier(z_t, t)
                        self.num_classes = int(logits.shape[1])
                        correct += int((logits.argmax(dim=1).cpu() == self.labels[sl]).sum())
                        total += int(t.shape[0])
                buckets.append({"bucket": b, "t_min": t_min, "t_max": t_max, "accuracy": correct / total, "n": total})
        finally:
            if was_training:
                self.classifier.train()
        self.buckets = buckets
        return buckets

    @property
    def chance(self) -> float | None:
        """Chance-level accuracy ``1 / K`` (known once :meth:`compute` has run), else None."""
        return None if not self.num_classes else 1.0 / self.num_classes

    def to_dict(self, epoch: int | None = None) -> dict[str, Any]:
        """The last results as a JSON-serialisable dict (computing them first if needed)."""
        if not self.buckets:
            self.compute()
        return {
            "epoch": epoch,
            "num_train_timesteps": self.num_train_timesteps,
            "num_buckets": self.num_buckets,
            "timesteps_per_bucket": self.timesteps_per_bucket,
            "scale_factor": self.scale_factor,
            "seed": self.seed,
            "num_latents": int(self.latents.shape[0]),
            "num_classes": self.num_classes,
            "chance": self.chance,
            "buckets": self.buckets,
            "history": self.history,
        }

    def write_json(self, path: PathLike, epoch: int | None = None) -> None:
        """Write :meth:`to_dict` to ``path`` (parent folders are created; the file is replaced atomically)."""
        _write_json(self.to_dict(epoch), path)

    def attach(self, engine: Engine) -> None:
        """Run :meth:`__call__` on ``EPOCH_COMPLETED`` every ``interval`` epochs of ``engine``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        """
        Compute the buckets and publish them: ``engine.state.metrics`` on every rank; JSON, PNG and TensorBoard
        scalars on rank 0 only.
        """
        epoch = int(engine.state.epoch)
        buckets = self.compute()
        for item in buckets:
            engine.state.metrics[f"{self.metric_prefix}{item['bucket']}"] = item["accuracy"]
        self.history.append({"epoch": epoch, "accuracy": [item["accuracy"] for item in buckets]})
        if not _is_rank0():
            return
        if self.output_dir is not None:
            self.write_json(os.path.join(os.fspath(self.output_dir), "timestep_accuracy.json"), epoch=epoch)
            if self.plot:
                plot_timestep_accuracy(
                    buckets,
                    os.path.join(os.fspath(self.output_dir), "timestep_accuracy.png"),
                    chance=self.chance,
                    title=f"latent classifier accuracy per timestep (epoch {epoch})",
                )
        if self.summary_writer is not None:
            for item in buckets:
                self.summary_writer.add_scalar(f"val/acc_t{item['t_min']}-{item['t_max']}", item["accuracy"], epoch)


def plot_timestep_accuracy(
    buckets: Sequence[dict[str, Any]],
    path_png: PathLike,
    chance: float | None = None,
    title: str = "latent classifier accuracy per timestep",
) -> None:
    """
    Save a bar chart of the accuracy per timestep bucket, with the chance level as a dashed line, to see at a glance up
    to which noise level the latent classifier still knows the class.

    Uses matplotlib's Agg canvas directly (no pyplot, so no global backend is changed).

    Args:
        buckets: the output of :meth:`TimestepBucketAccuracy.compute` (dicts with ``t_min``, ``t_max``, ``accuracy``).
        path_png: output PNG; parent folders are created.
        chance: chance-level accuracy (``1 / num_classes``); no line is drawn if None.
        title: the chart title.
    """
    if len(buckets) == 0:
        raise ValueError("buckets must not be empty.")
    acc = [float(item["accuracy"]) for item in buckets]
    names = [f"{item['t_min']}-{item['t_max']}" for item in buckets]
    fig = Figure(figsize=(max(4.0, 0.6 * len(buckets) + 1.5), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(acc)), acc, color="tab:blue")
    for i, a in enumerate(acc):
        ax.text(i, a + 0.01, f"{a:.2f}", ha="center", va="bottom", fontsize=7)
    if chance is not None:
        ax.axhline(chance, color="tab:red", linestyle="--", linewidth=1.0, label=f"chance ({chance:.2f})")
        ax.legend(loc="upper right", fontsize=7)
    ax.set_xticks(range(len(acc)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0.0, 1.08)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    parent = os.path.dirname(os.fspath(path_png))
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(os.fspath(path_png), dpi=100, format="png")
