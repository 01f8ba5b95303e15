"""Models: our timm-compatible ViT, encoder loading/export, the SALT predictor and the stage-1 MAE decoder.

    from usjepa.models import build_vit, load_encoder
    enc = load_encoder("urfm.pth", "vit_base_patch16_224")     # or a .safetensors, or our checkpoint
    tokens = enc.patch_tokens(images)                            # [B, 196, 768], after the final norm
"""

from usjepa.models.loading import (
    CheckpointFormatError,
    encoder_state_dict,
    export_encoder_safetensors,
    file_sha256,
    load_encoder,
    normalise_encoder_keys,
    read_weights_file,
)
from usjepa.models.mae import (
    DecoderConfig,
    MAEDecoder,
    MAEModel,
    mae_loss,
    mae_step_flops,
    patchify,
    random_keep_indices,
    stage1_masks,
)
from usjepa.models.salt import (
    Predictor,
    PredictorConfig,
    SALTModel,
    freeze,
    TARGET_NORMS,
    salt_forward,
    salt_loss,
    salt_step_flops,
    teacher_targets,
    token_std,
)
from usjepa.models.vit import (
    ARCHS,
    ViTConfig,
    VisionTransformer,
    build_vit,
    gather_tokens,
    num_params,
    transformer_flops,
    vit_config,
    vit_forward_flops,
)

__all__ = [
    "ARCHS",
    "CheckpointFormatError",
    "DecoderConfig",
    "MAEDecoder",
    "MAEModel",
    "Predictor",
    "PredictorConfig",
    "SALTModel",
    "ViTConfig",
    "VisionTransformer",
    "build_vit",
    "encoder_state_dict",
    "export_encoder_safetensors",
    "freeze",
    "gather_tokens",
    "load_encoder",
    "mae_loss",
    "mae_step_flops",
    "normalise_encoder_keys",
    "num_params",
    "patchify",
    "random_keep_indices",
    "stage1_masks",
    "read_weights_file",
    "TARGET_NORMS",
    "file_sha256",
    "salt_forward",
    "salt_loss",
    "token_std",
    "salt_step_flops",
    "teacher_targets",
    "transformer_flops",
    "vit_config",
    "vit_forward_flops",
]
