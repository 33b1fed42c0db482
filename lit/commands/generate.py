"""``hybridvl generate``: answer a prompt about an image or a video with a saved model.

    hybridvl generate --model student --image photo.jpg --prompt "What is written here?"
    hybridvl generate --model student --video clip.mp4 --fps 2 --prompt "What happens?"

The model directory holds the weights (``save_pretrained`` or a conversion) and the processor files
(tokenizer, chat template, ``generation_config.json``) copied from the teacher. Decoding follows the model's
``generation_config.json`` (greedy or sampling, temperature, top-k/top-p, repetition penalty, stop tokens), as
transformers' ``model.generate`` does; each option given here overrides its setting. The answer is printed as it
is generated. Options are checked, and the image or video read, before the model loads.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TextStreamer

from hybridvl.lit.cli import ArgumentParser, device_argument, dtype_argument
from hybridvl.models.chat import chat_inputs, load_processor
from hybridvl.models.generation import check_generation_options
from hybridvl.models.hybrid import HybridVLM
from hybridvl.vision import load_image, read_video

logger = logging.getLogger("hybridvl.generate")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="hybridvl generate", description=__doc__)
    parser.add_argument("--model", required=True, help="model directory (or a hub id in the local cache)")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--image", type=Path, help="an image file")
    media.add_argument("--video", type=Path, help="a video file")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--fps", type=float, default=2.0, help="video frames per second to sample")
    parser.add_argument("--max-frames", type=int, default=None, help="at most this many video frames")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens")
    decoding = parser.add_mutually_exclusive_group()
    decoding.add_argument(
        "--sample", dest="do_sample", action="store_const", const=True, help="sample (default: as the model's config)"
    )
    decoding.add_argument("--greedy", dest="do_sample", action="store_const", const=False, help="decode greedily")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the config's)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the K likeliest tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens of mass P")
    parser.add_argument(
        "--repetition-penalty", type=float, default=None, help="penalise repeated tokens (> 1; default: the config's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument(
        "--device",
        type=device_argument,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda, cuda:N or mps",
    )
    parser.add_argument("--dtype", type=dtype_argument, default=None, help="e.g. bfloat16 (unset: float32)")
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="load weights holding NaN or inf (refused by default, naming the tensor)",
    )
    args = parser.parse_args(argv)
    temperature = 1.0 if args.temperature is None else args.temperature
    try:
        check_generation_options(args.max_new_tokens, temperature, args.top_k, args.top_p)
        penalty = args.repetition_penalty
        if penalty is not None and not (math.isfinite(penalty) and penalty > 0):
            raise ValueError(f"repetition_penalty must be a positive finite number, got {penalty!r}")
    except ValueError as error:
        parser.error(str(error))
    if not args.prompt.strip():
        parser.error("--prompt is empty; give the question or instruction")
    if not (math.isfinite(args.fps) and args.fps > 0):
        parser.error(f"--fps must be a positive finite number, got {args.fps}")
    if args.max_frames is not None and args.video is None:
        parser.error("--max-frames limits the frames of --video; give a --video or drop it")
    if args.do_sample is False and (args.temperature is not None or args.top_k is not None or args.top_p is not None):
        logger.warning("--temperature, --top-k and --top-p only apply when sampling; decoding greedily (--greedy)")
    return args


def check_answer_length(tokenizer: Any, max_new_tokens: int, prompt_tokens: int = 0) -> None:
    """Raise ``ValueError`` if ``prompt_tokens + max_new_tokens`` exceeds the tokenizer's ``model_max_length``, the
    context the model was made for: beyond it, a model that never emits its stop token would decode for hours."""
    limit = tokenizer.model_max_length
    if prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} after a prompt of {prompt_tokens} tokens exceeds the model's context "
            f"of {limit} tokens (model_max_length of its tokenizer); give at most {max(1, limit - prompt_tokens)}"
        )


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding options given on the command line (those not given keep ``generation_config.json``'s)."""
    names = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {"max_new_tokens": args.max_new_tokens, **options}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    images = [load_image(args.image)] if args.image else []
    videos = [(read_video(args.video, args.fps, args.max_frames)[0], args.fps)] if args.video else []
    model = HybridVLM.from_pretrained(
        args.model, dtype=args.dtype, device_map=args.device, allow_nonfinite=args.allow_nonfinite
    )
    processor = load_processor(args.model)
    inputs = chat_inputs(processor, args.prompt, images, videos)
    check_answer_length(processor.tokenizer, args.max_new_tokens, inputs["input_ids"].shape[1])
    inputs = {key: value.to(args.device) for key, value in inputs.items()}
    torch.manual_seed(args.seed)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    tokens = model.generate(**inputs, **generation_options(args), streamer=streamer)
    seconds = time.perf_counter() - start
    new = tokens.shape[1] - inputs["input_ids"].shape[1]
    print(
        f"{new} tokens in {seconds:.2f} s ({model.kinds.count('A')} growing attention layers)",
        file=sys.stderr,
    )
    return 0
