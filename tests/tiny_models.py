"""Tiny random stand-ins for the real models, written with ``save_pretrained``.

Not a test file: a helper the tests (and other helpers) import. Everything is built
offline, so the code under test loads these folders through exactly the same
``from_pretrained`` path it uses for real checkpoints (DESIGN.md: "tests exercise that
same path with tiny models saved to a temporary folder").

- ``make_tiny_llm``: a decoder-only (Llama-, Qwen2-like) or encoder-decoder (T5) model
  saved as its usual *ForCausalLM / ForConditionalGeneration* checkpoint, plus a
  byte-level tokenizer (BPE without merges, so every byte is one token).
- ``make_tiny_sd_base``: the text side of a diffusers base folder (``tokenizer/``,
  ``text_encoder/`` and for SDXL ``tokenizer_2/``, ``text_encoder_2/``). It only writes
  its own sub-folders, so UNet / VAE / scheduler builders can add theirs to the same path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from linguadiff.offline_tokenizers import EOS, bytes_to_unicode, save_clip_tokenizer

LLMKind = Literal["llama", "qwen2", "t5"]
SDKind = Literal["sd15", "sdxl"]

# Words the tiny CLIP tokenizer merges into single tokens, so that its BPE really runs
# merges (and a word can be shorter than its characters) as the real one does.
_CLIP_MERGED_WORDS = ("the", "and", "red", "blue", "a")


def _byte_level_tokenizer(specials: list[str], specials_first: bool) -> tuple[Tokenizer, dict[str, int]]:
    """A byte-level BPE with no merges: one token per UTF-8 byte, plus ``specials``."""
    alphabet = list(bytes_to_unicode().values())
    tokens = specials + alphabet if specials_first else alphabet + specials
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok, vocab


def make_tiny_llm(
    path: str | Path,
    kind: LLMKind = "llama",
    vocab: int = 320,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    tokenizer_adds_bos: bool | None = None,
    config_bos: bool = True,
    positions: int = 128,
    seed: int = 0,
) -> Path:
    """Write a tiny random LLM and its tokenizer to ``path``; return ``path``.

    ``kind`` mimics a family's tokenizer conventions, which is what the text encoder must
    cope with:
      - ``"llama"``: ``<s>`` BOS added by the tokenizer (Llama 2/3), no pad token (Llama 3).
        ``tokenizer_adds_bos=False`` keeps the BOS token but stops adding it, as some
        SentencePiece configurations (Baichuan2) do.
      - ``"qwen2"``: no BOS token in the tokenizer, pad = eos = ``<|endoftext|>``, and as
        in Qwen2.5's config.json the model config's ``bos_token_id`` is ``<|endoftext|>``
        (``config_bos=False`` leaves it out).
      - ``"t5"``: no BOS, ``</s>`` appended, ``<pad>`` = 0 (T5 / mT5), saved as the full
        encoder-decoder checkpoint.
    ``vocab`` is the model's embedding size (at least the 259 tokens the tokenizer has;
    real models also round it up).
    """
    path = Path(path)
    if kind == "llama":
        tok, ids = _byte_level_tokenizer(["<unk>", "<s>", "</s>"], specials_first=True)
        adds_bos = True if tokenizer_adds_bos is None else tokenizer_adds_bos
        if adds_bos:
            tok.post_processor = processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["<s>"])]
            )
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    elif kind == "qwen2":
        tok, ids = _byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], specials_first=False)
        special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    elif kind == "t5":
        tok, ids = _byte_level_tokenizer(["<pad>", "</s>", "<unk>"], specials_first=True)
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", ids["</s>"])]
        )
        special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    else:
        raise ValueError(f"unknown tiny LLM kind {kind!r}; expected 'llama', 'qwen2' or 't5'")
    if vocab < len(ids):
        raise ValueError(f"vocab={vocab} is smaller than the tokenizer's {len(ids)} tokens")

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **special)
    tokenizer.save_pretrained(path)

    def token_id(name: str) -> int | None:
        return ids[special[name]] if name in special else None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "t5":
            config = T5Config(
                vocab_size=vocab,
                d_model=hidden,
                d_kv=hidden // heads,
                d_ff=2 * hidden,
                num_layers=layers,
                num_decoder_layers=layers,
                num_heads=heads,
                pad_token_id=token_id("pad_token"),
                eos_token_id=token_id("eos_token"),
                decoder_start_token_id=token_id("pad_token"),
            )
            model = T5ForConditionalGeneration(config)
        else:
            config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
            config = config_cls(
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=positions,
                bos_token_id=ids["<|endoftext|>"] if kind == "qwen2" and config_bos else token_id("bos_token"),
                eos_token_id=token_id("eos_token"),
                pad_token_id=token_id("pad_token"),
            )
            model = model_cls(config)
    model.save_pretrained(path)
    return path


def _save_clip_tokenizer(folder: Path, pad_token: str, max_length: int) -> CLIPTokenizer:
    """Write a CLIP tokenizer the way the diffusers base repos ship it (vocab.json, merges.txt).

    As in CLIP, byte characters come first (so ``"!"`` has id 0: SDXL pads its second
    tokenizer with it) and the specials last (``<|endoftext|>`` has the highest id, which
    CLIPTextModel's legacy pooling, the argmax of the ids, relies on).
    """
    save_clip_tokenizer(folder, _CLIP_MERGED_WORDS, model_max_length=max_length, pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(folder)


def _clip_text_config(tokenizer: CLIPTokenizer, hidden: int, layers: int, heads: int, max_length: int,
                      projection_dim: int | None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
        **({"projection_dim": projection_dim} if projection_dim is not None else {}),
    )


def make_tiny_sd_base(
    path: str | Path,
    kind: SDKind = "sd15",
    hidden: int = 32,
    hidden_2: int = 48,
    projection_dim: int = 40,
    layers: int = 2,
    heads: int = 4,
    max_length: int = 77,
    seed: int = 0,
) -> Path:
    """Write the text-encoder side of a diffusers base folder to ``path``; return ``path``.

    sd15: ``tokenizer/`` + ``text_encoder/`` (CLIPTextModel, width ``hidden``).
    sdxl: also ``tokenizer_2/`` (pad ``"!"`` as SDXL's) + ``text_encoder_2/``
    (CLIPTextModelWithProjection, width ``hidden_2``, ``text_embeds`` of ``projection_dim``).
    Other folders under ``path`` are left alone, so UNet / VAE / scheduler builders compose.
    """
    if kind not in ("sd15", "sdxl"):
        raise ValueError(f"unknown tiny SD kind {kind!r}; expected 'sd15' or 'sdxl'")
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _save_clip_tokenizer(path / "tokenizer", EOS, max_length)
        config = _clip_text_config(tokenizer, hidden, layers, heads, max_length, projection_dim=None)
        CLIPTextModel(config).save_pretrained(path / "text_encoder")
        if kind == "sdxl":
            tokenizer_2 = _save_clip_tokenizer(path / "tokenizer_2", "!", max_length)
            config_2 = _clip_text_config(tokenizer_2, hidden_2, layers, heads, max_length, projection_dim)
            CLIPTextModelWithProjection(config_2).save_pretrained(path / "text_encoder_2")
    return path


def make_tiny_sd_pipeline(path: str | Path, kind: SDKind = "sd15", seed: int = 0) -> Path:
    """A complete tiny SD1.5- or SDXL-shaped diffusers folder (model_index.json, unet/, vae/,
    scheduler/ and the text side), written by the diffusers pipeline's own save_pretrained so
    that ``StableDiffusion(XL)Pipeline.from_pretrained`` loads it like the real one."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel

    path = make_tiny_sd_base(path, kind=kind, seed=seed)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
        )
        unet_args = dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=2, norm_num_groups=8,
        )
        scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        if kind == "sd15":
            unet = UNet2DConditionModel(cross_attention_dim=text_encoder.config.hidden_size, **unet_args)
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        else:
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2")
            tokenizer_2 = CLIPTokenizer.from_pretrained(path / "tokenizer_2")
            unet = UNet2DConditionModel(
                cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + text_encoder_2.config.projection_dim,
                **unet_args,
            )
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
            )
    pipe.save_pretrained(path)
    return path
