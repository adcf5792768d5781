"""Stage-1 throughput: how close a full training step comes to the frozen LLM's forward alone.

Stage 1 runs, every step, a frozen LLM forward (the student's input), a frozen CLIP forward
(the teacher's target) and a train step of the adapter. The LLM is the part no one can
make cheaper, so it is the reference: the issue's target is a full step at >= 90% of the
LLM-forward-alone rate. Everything here is measured, never asserted.

    python benchmarks/bench_stage1.py --preset demo                 # CPU, the committed demo
    python benchmarks/bench_stage1.py --preset sdxl-7b --compile    # GPU, random 7B + SDXL teacher
    python benchmarks/bench_stage1.py --preset sdxl-7b --tiny       # the GPU code path, tiny, on CPU

The measured code is the project's: ``LLMTextEncoder.forward``, ``CLIPTeacher.forward``,
``QueryAdapter``, and ``Stage1Alignment``'s own ``student`` / ``alignment`` and optimizer
(``configure_optimizers``: fused AdamW on a GPU), with sizes and loss weights from the
project's config (``stage=1 model=sdxl llm=qwen2.5-7b``, or the demo defaults).

sdxl-7b builds random models directly on the device in their dtype: a random 7B written
with ``save_pretrained`` and read back would be 15 GB of disk and minutes of I/O for
nothing. ``LLMTextEncoder`` and ``CLIPTeacher`` only take a path, so two thin subclasses
(``InMemoryTextEncoder``, ``_InMemoryTeacher``) set the attributes their ``__init__``
would set around the in-memory models and inherit everything else, ``forward`` included.
``--tiny`` checks on CPU that they give exactly what the real classes loaded with
``from_pretrained`` give.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from linguadiff.models.clip_teacher import CLIPPromptTokenizer, CLIPTeacher, teacher_kind  # noqa: E402
from linguadiff.models.frozen import freeze  # noqa: E402
from linguadiff.models.prompt_encoder import PromptEncoder  # noqa: E402
from lightning_modules.settings import AlignmentSettings, StageSettings  # noqa: E402
from lightning_modules.stage1_alignment import Stage1Alignment  # noqa: E402
from linguadiff.models.text_encoder import LLMTextEncoder, PromptTokenizer, torch_dtype  # noqa: E402
from linguadiff.config import load_config, resolve  # noqa: E402
from linguadiff.offline_tokenizers import save_byte_tokenizer, save_clip_tokenizer  # noqa: E402
from timing import count_flops, finish_args, measure, print_table, setup_torch  # noqa: E402

# Qwen2.5-7B's config.json, but a 32000-token vocabulary: the embedding table costs memory,
# not compute (a lookup), and the benchmark never reads the LM head.
QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}}
# SDXL's text encoders: CLIP-L (text_encoder/) and OpenCLIP-bigG with projection (text_encoder_2/).
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
             "hidden_act": "gelu", "projection_dim": 1280}
# --tiny: the same code path at sizes a CPU runs in seconds. The adapter's width must be the
# teacher's (32 + 48); the config's other adapter sizes shrink with it.
TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 512}
TINY_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "hidden_act": "quick_gelu", "projection_dim": 32}
TINY_BIGG = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "hidden_act": "gelu", "projection_dim": 40}
TINY_ADAPTER = ["adapter.dim=80", "adapter.encoder_layers=2", "adapter.decoder_layers=2", "adapter.heads=4",
                "adapter.ffn_dim=160", "adapter.pooled_dim=40"]

PRESETS = {"demo": ["stage=1"], "sdxl-7b": ["stage=1", "model=sdxl", "llm=qwen2.5-7b"]}
# Words for synthetic prompts of realistic lengths (the byte-level LLM tokenizer and the
# merge-less CLIP tokenizer both give about one token per character, as real BPEs give
# about as many tokens for an English prompt).
WORDS = ("a photo of the red cat sitting on an old wooden chair near window soft light golden hour "
         "portrait of woman with blue hair highly detailed oil painting city street at night rain "
         "mountain lake forest fog cinematic wide angle shot").split()


# ---------------------------------------------------------------------------- models in memory

class InMemoryTextEncoder(LLMTextEncoder):
    """``LLMTextEncoder`` around a model already built on the device (no ``from_pretrained``).

    Sets what ``LLMTextEncoder.__init__`` sets, from the model itself and a folder holding
    only the tokenizer and config.json; ``forward`` is the project's. If ``__init__`` gains
    an attribute that ``forward`` reads, this fails loudly (AttributeError), never silently.
    """

    def __init__(self, model: nn.Module, tokenizer_dir: Path, max_length: int, layers, layer_mix: str, bos: str) -> None:
        nn.Module.__init__(self)
        self._name = f"random {model.config.model_type} (in memory)"
        self.model = freeze(model)
        self._tokenizer = PromptTokenizer(str(tokenizer_dir), max_length, bos)
        self.num_hidden_states = model.config.num_hidden_layers + 1
        self.layers = tuple(int(i) % self.num_hidden_states for i in layers)
        self.layer_mix = layer_mix
        self.model_width = int(model.config.hidden_size)
        freeze(self)


class _InMemoryTeacher(CLIPTeacher):
    """``CLIPTeacher`` around CLIP text models already built on the device; ``forward`` is the project's."""

    def __init__(self, base_dir: Path, kind: str, text_encoder: nn.Module, text_encoder_2: nn.Module | None) -> None:
        nn.Module.__init__(self)
        self._tokenizer = CLIPPromptTokenizer(base_dir, kind)
        self.kind = kind
        self.text_encoder = freeze(text_encoder)
        self.text_encoder_2 = freeze(text_encoder_2) if text_encoder_2 is not None else None
        freeze(self)


def _clip_config(sizes: dict, tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **sizes)


def build_random_sdxl_7b(cfg, folder: Path, device: torch.device, tiny: bool, llm_attn: str,
                         teacher_dtype: torch.dtype) -> tuple[LLMTextEncoder, CLIPTeacher]:
    """Random Qwen2.5-7B + SDXL text encoders, built on ``device`` in their dtypes; tokenizers offline."""
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, Qwen2Config

    llm_dir, base_dir = folder / "llm", folder / "base"
    save_byte_tokenizer(llm_dir)
    tok = AutoTokenizer.from_pretrained(llm_dir)
    llm_config = Qwen2Config(**(TINY_LLM if tiny else QWEN25_7B), bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    llm_config.save_pretrained(llm_dir)  # config.json only: PromptTokenizer reads the position limit
    # SDXL pads CLIP-L's windows with its EOS and bigG's with "!". No merges: one token per character.
    save_clip_tokenizer(base_dir / "tokenizer", ())
    save_clip_tokenizer(base_dir / "tokenizer_2", (), pad_token="!")
    tok_1 = CLIPTokenizer.from_pretrained(base_dir / "tokenizer")
    tok_2 = CLIPTokenizer.from_pretrained(base_dir / "tokenizer_2")
    llm_dtype = torch_dtype(cfg.llm.dtype) if device.type == "cuda" else torch.float32
    with torch.device(device):
        llm = AutoModel.from_config(llm_config, dtype=llm_dtype, attn_implementation=llm_attn)
        clip_l = CLIPTextModel(_clip_config(TINY_CLIP_L if tiny else CLIP_L, tok_1)).to(teacher_dtype)
        bigg = CLIPTextModelWithProjection(_clip_config(TINY_BIGG if tiny else CLIP_BIGG, tok_2)).to(teacher_dtype)
    encoder = InMemoryTextEncoder(llm, llm_dir, cfg.llm.max_length, tuple(cfg.llm.layers), cfg.llm.layer_mix, cfg.llm.bos)
    teacher = _InMemoryTeacher(base_dir, "sdxl", clip_l, bigg)
    if tiny:  # the shortcut must be exact: compare with the real classes loaded from_pretrained
        llm.save_pretrained(llm_dir)
        clip_l.save_pretrained(base_dir / "text_encoder")
        bigg.save_pretrained(base_dir / "text_encoder_2")
        _check_same(encoder, teacher, LLMTextEncoder(str(llm_dir), dtype=llm_dtype, max_length=cfg.llm.max_length,
                                                     layers=tuple(cfg.llm.layers), layer_mix=cfg.llm.layer_mix,
                                                     bos=cfg.llm.bos).to(device),
                    CLIPTeacher(base_dir, "sdxl", dtype=teacher_dtype).to(device))
    return encoder, teacher


def _check_same(encoder, teacher, real_encoder, real_teacher) -> None:
    texts = ["a red cat", "portrait of woman with blue hair " * 4, ""]
    mine, real = encoder.encode(texts), real_encoder.encode(texts)
    t_mine, t_real = teacher.encode(texts), real_teacher.encode(texts)
    diffs = [(mine[0] - real[0]).abs().max().item(), (t_mine["context"] - t_real["context"]).abs().max().item(),
             (t_mine["pooled"] - t_real["pooled"]).abs().max().item()]
    same_mask = torch.equal(mine[1], real[1])
    print(f"self-check: in-memory vs from_pretrained max |diff| LLM {diffs[0]:.1e}, teacher context {diffs[1]:.1e}, "
          f"pooled {diffs[2]:.1e}, masks equal {same_mask}")
    if max(diffs) > 0 or not same_mask:
        raise SystemExit("self-check failed: the in-memory models differ from the project's from_pretrained path")


def build_demo(cfg, folder: Path, teacher_dtype: torch.dtype) -> tuple[LLMTextEncoder, CLIPTeacher]:
    """The committed demo through the project's own loaders.

    Until ``scripts/make_demo_base.py`` has written ``assets/demo_base/text_encoder``, the
    teacher is a random CLIP of that script's sizes next to the committed tokenizer: same
    shapes, so the same cost.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    encoder = LLMTextEncoder(cfg.llm.path, dtype=cfg.llm.dtype, max_length=cfg.llm.max_length,
                             layers=tuple(cfg.llm.layers), layer_mix=cfg.llm.layer_mix, bos=cfg.llm.bos)
    base = Path(cfg.model.path)
    if not (base / "text_encoder").is_dir():
        print(f"note: {base}/text_encoder is missing (scripts/make_demo_base.py writes it); "
              "timing a random CLIP text encoder of its sizes instead")
        tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
        tokenizer.save_pretrained(folder / "base" / "tokenizer")
        sizes = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "projection_dim": 64}
        CLIPTextModel(_clip_config(sizes, tokenizer)).save_pretrained(folder / "base" / "text_encoder")
        base = folder / "base"
    return encoder, CLIPTeacher(base, teacher_kind(cfg.model.kind), dtype=teacher_dtype)


# ---------------------------------------------------------------------------- prompts

def synthetic_prompts(n: int, low: int, high: int, rng: random.Random) -> list[str]:
    """Prompts of ``low..high`` characters (about as many LLM tokens) made of plain words."""
    out = []
    for _ in range(n):
        target, words = rng.randint(low, high), []
        while len(" ".join(words)) < target:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words)[:target].strip())
    return out


def demo_prompts(n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Parallel demo captions: a random language to the LLM, the English to CLIP (as in training)."""
    from datamodules import demo_data

    student, teacher = [], []
    for _ in range(n):
        captions = demo_data.parallel_captions(demo_data.sample_scene(rng), rng)
        student.append(captions[rng.choice(demo_data.LANGUAGES)])
        teacher.append(captions["en"])
    return student, teacher


def pad_to(tokens: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to ``length`` (the paper's code padded every prompt to the maximum length)."""
    extra = length - tokens["input_ids"].shape[1]
    if extra <= 0:
        return tokens
    ids = torch.nn.functional.pad(tokens["input_ids"], (0, extra), value=pad_id)
    return {"input_ids": ids, "attention_mask": torch.nn.functional.pad(tokens["attention_mask"], (0, extra), value=0)}


# ---------------------------------------------------------------------------- timing

# ---------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--tiny", action="store_true", help="sdxl-7b's code path at tiny sizes (CPU self-check)")
    p.add_argument("--device", default=None, help="default: cuda for sdxl-7b (cpu with --tiny), cpu for demo")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=None, help="timed steps per row (default 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on GPU, 1 on CPU)")
    p.add_argument("--max-length", type=int, default=None, help="LLM max tokens (default: the config's, 256)")
    p.add_argument("--min-chars", type=int, default=20, help="synthetic prompts: shortest (about tokens)")
    p.add_argument("--max-chars", type=int, default=120, help="synthetic prompts: longest (about tokens)")
    p.add_argument("--pad-to-max-length", action="store_true",
                   help="pad LLM inputs to --max-length as the paper's code did (default: the batch's longest)")
    p.add_argument("--compile", action="store_true", help="also time the adapter under torch.compile")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for the fp32 matmuls left outside autocast")
    p.add_argument("--teacher-dtype", default=None, help="CLIP weights (default: the config's model.dtype on GPU)")
    p.add_argument("--llm-attn", default="sdpa", help="attn_implementation of the random LLM (sdpa, eager, ...)")
    p.add_argument("--no-autocast", action="store_true", help="no bf16 autocast on GPU (fp32 weights stay fp32)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra step per row)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return finish_args(p, p.parse_args(argv), gpu_iters=10, gpu_warmup=3)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    rng = setup_torch(args)

    overrides = list(PRESETS[args.preset]) + (TINY_ADAPTER if args.tiny else [])
    if args.max_length:
        overrides.append(f"llm.max_length={args.max_length}")
    cfg = load_config(overrides)
    # The data section's resolvers build the demo shards on first use: nothing here reads data.
    del cfg["data"]
    cfg = resolve(cfg)
    on_gpu = device.type == "cuda"
    teacher_dtype = torch_dtype(args.teacher_dtype or (cfg.model.dtype if on_gpu else "float32"))
    autocast = on_gpu and not args.no_autocast

    with tempfile.TemporaryDirectory(prefix="bench_stage1_") as tmp:
        started = time.perf_counter()
        if args.preset == "demo":
            encoder, teacher = build_demo(cfg, Path(tmp), teacher_dtype)
            student_texts, teacher_texts = demo_prompts(args.batch_size, rng)
        else:
            encoder, teacher = build_random_sdxl_7b(cfg, Path(tmp), device, args.tiny, args.llm_attn, teacher_dtype)
            student_texts = synthetic_prompts(args.batch_size, args.min_chars, args.max_chars, rng)
            teacher_texts = student_texts
        # The stage module checks the shapes and sets what trains, exactly as train.py does.
        module = Stage1Alignment(StageSettings.from_config(cfg), AlignmentSettings.from_config(cfg, teacher.context_parts),
                                 PromptEncoder.with_new_adapter(encoder, cfg.adapter), teacher).to(device)
        module.on_fit_start()  # asserts the trainable set; computes the empty-prompt target
        optimizer = module.configure_optimizers()["optimizer"]
        build_s = time.perf_counter() - started

        # Tokenized once, outside the timing: in training the data workers tokenize.
        s_tok = encoder.tokenizer(student_texts)
        lengths = s_tok["attention_mask"].sum(1).float()
        if args.pad_to_max_length:
            s_tok = pad_to(s_tok, encoder.tokenizer.max_length, encoder.tokenizer.pad_id)
        s_tok = {k: v.to(device) for k, v in s_tok.items()}
        t_tok = {k: v.to(device) for k, v in teacher.tokenizer(teacher_texts).items()}
        batch = args.batch_size

        def amp():
            return torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)

        def llm_forward():
            with amp():
                return encoder(s_tok["input_ids"], s_tok["attention_mask"])

        def teacher_forward():
            with amp():
                return teacher(t_tok)

        features, mask = llm_forward()
        targets = teacher_forward()
        empty_weight = float(cfg.loss.empty_prompt_weight)

        def train_on(student: dict, target: dict) -> None:
            """Stage1Alignment.training_step's loss, then what Lightning does with it."""
            with amp():
                loss = module.alignment(student, target)["loss"]
                if empty_weight > 0:
                    empty_in, empty_target = module.empty_prompt()
                    empty = module.alignment(module.prompt_encoder.from_features(*empty_in), empty_target)
                    loss = loss + empty_weight * empty["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def adapter_step():
            with amp():
                student = module.prompt_encoder.from_features(features, mask)
            train_on(student, targets)

        def full_step():
            # Stage1Alignment's own teacher and student (LLM + adapter) calls, as training_step makes them.
            with amp():
                target = module.teacher(t_tok)
                student = module.student(s_tok)
            train_on(student, target)

        plan = [("1 LLM forward (no grad)", llm_forward), ("2 teacher forward (3 windows x 2 CLIPs)"
                if teacher.kind == "sdxl" else "2 teacher forward (CLIP)", teacher_forward),
                ("3 adapter train step", adapter_step), ("4 full stage-1 step, eager", full_step)]
        rows, flops = [], {}
        for name, step in plan:
            flops[name] = None if args.no_flops else count_flops(step)
            rows.append(measure(name, step, batch, args, device, count=False, flops=flops[name]))
        if args.compile:
            module.adapter = torch.compile(module.adapter)
            started_compile = time.perf_counter()
            adapter_step()  # compiles; the timed rows below then reuse it
            print(f"  torch.compile of the adapter: {time.perf_counter() - started_compile:.1f} s to first step")
            rows.append(measure("3c adapter train step, compiled", adapter_step, batch, args, device, count=False, flops=flops[plan[2][0]]))
            rows.append(measure("5 full stage-1 step, adapter compiled", full_step, batch, args, device, count=False, flops=flops[plan[3][0]]))

    reference = rows[0].samples_per_s
    by_key = {r.name.split(" ")[0]: r for r in rows}
    ratios = {f"{k}/1": by_key[k].samples_per_s / reference for k in ("4", "5") if k in by_key}
    info = {
        "preset": args.preset + (" --tiny" if args.tiny else ""),
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU ({platform.processor() or platform.machine()}, "
                                                                     f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "batch": batch,
        "llm_tokens_mean": round(lengths.mean().item(), 1),
        "llm_tokens_max": int(lengths.max().item()),
        "llm_padded_to": int(s_tok["input_ids"].shape[1]),
        "teacher_tokens": f"{tuple(t_tok['input_ids'].shape)}",
        "autocast_bf16": autocast,
        "llm_dtype": str(next(encoder.model.parameters()).dtype),
        "teacher_dtype": str(teacher_dtype),
        "adapter_params_m": round(sum(p.numel() for p in module.adapter.parameters()) / 1e6, 1),
        "fused_adamw": bool(optimizer.defaults.get("fused")),
        "iters": args.iters,
        "warmup": args.warmup,
        "build_s": round(build_s, 1),
    }
    print_table(info, rows, {f"ratio row {key} (target >= 0.90)": value for key, value in ratios.items()}, "prompts")
    result = {"info": info, "rows": [asdict(r) for r in rows], "ratios": ratios}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
