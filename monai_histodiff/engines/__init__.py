"""Training engines and their plumbing: autoencoder (VAE-GAN) training, decoder fine-tuning, the latent cache,
latent prepare-batch callables and the latent scale factor."""

from __future__ import annotations

__all__: list[str] = []

# --- latent-side plumbing: latent cache, prepare-batch for stage 1 / stage 2, scale factor ---
from monai_histodiff.engines.latent_cache import (  # noqa: E402
    LATENT_MU_KEY,
    LATENT_SIGMA_KEY,
    CachedLatentDataset,
    LatentCache,
    encode_posteriors,
    get_or_create_latent_cache,
    load_latent_cache,
)
from monai_histodiff.engines.sharded_latent_cache import (  # noqa: E402
    ShardedLatentCache,
    get_or_create_sharded_latent_cache,
)
from monai_histodiff.engines.prepare_batch import (  # noqa: E402
    ClassConditionalPrepareBatch,
    LatentDiffusionPrepareBatch,
    NoisyLatentClassificationPrepareBatch,
    resolve_scale_factor,
    sample_latents,
    scaled_latents,
)
from monai_histodiff.engines.scale_factor import RunningMoments, compute_scale_factor  # noqa: E402

__all__ += [
    "LATENT_MU_KEY",
    "LATENT_SIGMA_KEY",
    "CachedLatentDataset",
    "LatentCache",
    "encode_posteriors",
    "get_or_create_latent_cache",
    "load_latent_cache",
    "ShardedLatentCache",
    "get_or_create_sharded_latent_cache",
    "LatentDiffusionPrepareBatch",
    "ClassConditionalPrepareBatch",
    "NoisyLatentClassificationPrepareBatch",
    "resolve_scale_factor",
    "sample_latents",
    "scaled_latents",
    "RunningMoments",
    "compute_scale_factor",
]
# --- end latent-side plumbing ---

# --- stage 1 training: autoencoder trainer, losses, warm-up, device / DDP / sampler choices ---
from monai_histodiff.engines.autoencoder import AutoencoderKLTrainer  # noqa: E402
from monai_histodiff.engines.distributed import (  # noqa: E402
    all_ranks_agree,
    barrier,
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    make_sampler,
    prepare_network,
    resolve_device,
    unwrap_model,
)
from monai_histodiff.engines.losses import (  # noqa: E402
    build_perceptual_loss,
    diffusion_loss,
    kl_divergence,
    per_element_weight,
    reconstruction_loss,
)
from monai_histodiff.engines.loading import (  # noqa: E402
    check_classes,
    check_image_size,
    check_split,
    trained_image_size,
    checkpoint_classes,
    latent_shape_of,
    require_single_process,
    diffusion_meta,
    load_autoencoder,
    load_diffusion,
    load_image_classifier,
    load_latent_classifier,
    load_feature_extractor,
    load_tile_classifier,
    scheduler_from_meta,
)
from monai_histodiff.engines.sampling import (  # noqa: E402
    ClassConditionalSampler,
    ReconstructionComparison,
    UnconditionalSampler,
    optimize_for_inference,
)
from monai_histodiff.engines.schedules import LinearWarmup  # noqa: E402
from monai_histodiff.engines.locking import OutputLock  # noqa: E402

__all__ += [
    "AutoencoderKLTrainer",
    "cleanup_distributed",
    "barrier",
    "all_ranks_agree",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "make_sampler",
    "prepare_network",
    "resolve_device",
    "unwrap_model",
    "build_perceptual_loss",
    "diffusion_loss",
    "kl_divergence",
    "per_element_weight",
    "reconstruction_loss",
    "LinearWarmup",
    "OutputLock",
    "check_classes",
    "check_image_size",
    "check_split",
    "trained_image_size",
    "checkpoint_classes",
    "latent_shape_of",
    "require_single_process",
    "diffusion_meta",
    "load_autoencoder",
    "load_diffusion",
    "load_image_classifier",
    "load_latent_classifier",
    "load_feature_extractor",
    "load_tile_classifier",
    "scheduler_from_meta",
    "UnconditionalSampler",
    "ClassConditionalSampler",
    "ReconstructionComparison",
    "optimize_for_inference",
]
# --- end stage 1 training ---

# --- decoder fine-tuning (Eq. 5) ---
from monai_histodiff.engines.decoder_finetune import (  # noqa: E402
    DECODER_MODULES,
    DecoderFinetuneTrainer,
    DecoderView,
    decoder_parameters,
    freeze_encoder,
)

__all__ += ["DECODER_MODULES", "DecoderFinetuneTrainer", "DecoderView", "decoder_parameters", "freeze_encoder"]
# --- end decoder fine-tuning ---

# --- guided tile generation (bundles/generate.json) ---
from monai_histodiff.engines.generation import GuidedTileGenerator, merge_manifests, tile_seed  # noqa: E402

__all__ += ["GuidedTileGenerator", "merge_manifests", "tile_seed"]
# --- end guided tile generation ---

# --- class-conditional fine-tuning for classifier-free guidance (bundles/finetune_conditional.json) ---
from monai_histodiff.engines.conditional import (  # noqa: E402
    CONDITIONAL_STAGE,
    conditional_from_pretrained,
    conditional_latent_cache,
    check_conditional,
    conditional_meta,
    labeled_share_weights,
)

__all__ += ["CONDITIONAL_STAGE", "conditional_from_pretrained", "conditional_latent_cache", "conditional_meta",
            "check_conditional", "labeled_share_weights"]
# --- end class-conditional fine-tuning ---

# --- pseudo-labels of the site's unlabeled tiles for the latent classifier (an option, not the paper's method) ---
from monai_histodiff.engines.pseudo_labels import pseudo_label  # noqa: E402

__all__ += ["pseudo_label"]

# --- stage settings: their home is monai_histodiff.bundle.settings; re-exported here because the self-contained
# stage configs of adaptation kits exported before the move call $monai_histodiff.engines.check_settings ---
from monai_histodiff.bundle.settings import (  # noqa: E402
    SETTING_RULES,
    InvalidSettingError,
    SettingRule,
    check_settings,
)

__all__ += ["SETTING_RULES", "InvalidSettingError", "SettingRule", "check_settings"]
# --- end stage settings ---

# --- StyleGAN2 baseline (bundles/train_stylegan2.json, bundles/generate_stylegan2.json) ---
from monai_histodiff.engines.generation import TileGenerator  # noqa: E402
from monai_histodiff.engines.loading import load_stylegan2_generator  # noqa: E402
from monai_histodiff.engines.stylegan2 import ClassGridSampler, GanTileGenerator, StyleGAN2Trainer  # noqa: E402

__all__ += ["TileGenerator", "load_stylegan2_generator", "ClassGridSampler", "GanTileGenerator", "StyleGAN2Trainer"]
# --- end StyleGAN2 baseline ---
