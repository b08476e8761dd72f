"""The toy models' architecture: tokenizer, text encoder, VAE and UNet configs, in code.

The tokenizer is word-level for the toy world's own words and byte-level for everything else:
each grammar word (`red`, `circle`, `background`, …) and the identifier `sks` is one token, built
by BPE merges over the byte alphabet, so the text encoder does not first have to learn to spell
colours out of letters (with the byte-level tokenizer of `tiny`, "red" and "green" share nothing
a small model can see at once). Any other word still tokenizes, byte by byte.
"""

from __future__ import annotations

from typing import Any

from raybooth.platform.toy.world import COLOURS, RESOLUTION, SHAPES

# One token each. `sks` is DreamBooth's rare identifier: in the vocabulary, never in a caption.
WORDS: tuple[str, ...] = ("a", "on", "background", *COLOURS, *SHAPES, "sks")
# Captions are at most ~10 tokens; a short context keeps the text encoder and cross-attention cheap.
MAX_LENGTH = 16
HIDDEN = 64
LATENT_CHANNELS = 4
VAE_FACTOR = 4  # 32 px images, 8×8×4 latents: a quarter of the UNet work of 16×16


def make_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        # CLIP's BPE splits a word into characters with `</w>` on the last; merge left to right.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            pair = (left, right)
            left = left + right
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def text_encoder_config(tokenizer) -> dict[str, Any]:
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return dict(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_LENGTH,
    )


def vae_config() -> dict[str, Any]:
    return dict(
        # Flat colours need little width; no attention in the middle block (it costs, and a
        # centred shape needs no long-range mixing at 8×8).
        block_out_channels=[16, 32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        sample_size=RESOLUTION,
        norm_num_groups=8,
        mid_block_add_attention=False,
        # The latent mean and scale are folded into the VAE's quant convolutions after training
        # (jobs/toy/vae.py), so the stock pipelines' `latents * scaling_factor` is all it needs.
        scaling_factor=1.0,
    )


def unet_config(in_channels: int = LATENT_CHANNELS) -> dict[str, Any]:
    # Cross-attention only at the two coarsest levels and the middle block: about 3× the training
    # steps per second of attention everywhere, and the prompt is about global colour and shape.
    return dict(
        sample_size=RESOLUTION // VAE_FACTOR,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        # Levels 8×8, 4×4, 2×2. Measured on a shared 2-core machine: the 16×16 (32, 64, 128)
        # UNet of the probe took 2.7 s per batch-32 step on one contended core; this one
        # does the same work in a fraction, so ~4k steps fit the budget.
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=(4, 4, 8),
        norm_num_groups=16,
    )


def scheduler_config() -> dict[str, Any]:
    # Stable Diffusion v1's noise schedule; never clip latents (they are not in [-1, 1]).
    return dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
        prediction_type="epsilon",
    )


def training_scheduler():
    """The same noise schedule as the sampler's, as a DDPM scheduler (for `add_noise`)."""
    from diffusers import DDPMScheduler

    cfg = scheduler_config()
    return DDPMScheduler(**{k: cfg[k] for k in ("beta_start", "beta_end", "beta_schedule",
                                                   "clip_sample", "num_train_timesteps", "prediction_type")})
