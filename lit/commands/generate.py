"""``hybridvl generate``: answer a prompt about an image or a video with a saved model.

    hybridvl generate --model student --image photo.jpg --prompt "What is written here?"
    hybridvl generate --model student --video clip.mp4 --fps 2 --prompt "What happens?"

The model directory holds the weights (``save_pretrained`` or a conversion) and the processor files
(tokenizer, chat template) copied from the teacher. Options are checked, and the image or video read, before
the model loads.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from hybridvl.lit.cli import ArgumentParser, device_argument, dtype_argument
from hybridvl.models.chat import chat_inputs, load_processor, vision_kwargs
from hybridvl.models.generation import check_generation_options
from hybridvl.models.hybrid import HybridVLM
from hybridvl.vision import load_image, read_video

logger = logging.getLogger("hybridvl.generate")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="hybridvl generate", description=__doc__)
    parser.add_argument("--model", required=True, help="model directory")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--image", type=Path, help="an image file")
    media.add_argument("--video", type=Path, help="a video file")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--fps", type=float, default=2.0, help="video frames per second to sample")
    parser.add_argument("--max-frames", type=int, default=None, help="at most this many video frames")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the K likeliest tokens (with --sample)")
    parser.add_argument(
        "--top-p", type=float, default=None, help="sample from the smallest set of tokens of mass P (with --sample)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument(
        "--device",
        type=device_argument,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda, cuda:N or mps",
    )
    parser.add_argument("--dtype", type=dtype_argument, default=None, help="e.g. bfloat16 (unset: as saved)")
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="load weights holding NaN or inf (refused by default, naming the tensor)",
    )
    args = parser.parse_args(argv)
    try:
        check_generation_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as error:
        parser.error(str(error))
    if not args.sample and (args.temperature != 1.0 or args.top_k is not None or args.top_p is not None):
        logger.warning("--temperature, --top-k and --top-p only apply with --sample; decoding greedily")
    return args


def load_model(
    directory: str, device: torch.device, dtype: torch.dtype | None = None, allow_nonfinite: bool = False
) -> HybridVLM:
    """:meth:`HybridVLM.from_pretrained`, with a weights file that safetensors cannot read reported by name."""
    try:
        return HybridVLM.from_pretrained(directory, device=device, dtype=dtype, allow_nonfinite=allow_nonfinite)
    except SafetensorError as error:
        raise ValueError(
            f"cannot read the weights in {directory} ({error}): the safetensors file is truncated or damaged; "
            "save or convert the model again"
        ) from error


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    images = [load_image(args.image)] if args.image else []
    videos = [(read_video(args.video, args.fps, args.max_frames)[0], args.fps)] if args.video else []
    model = load_model(args.model, args.device, args.dtype, args.allow_nonfinite)
    processor = load_processor(args.model)
    inputs = chat_inputs(processor, args.prompt, images, videos)
    inputs = {key: value.to(args.device) for key, value in inputs.items()}
    model.eval()
    start = time.perf_counter()
    tokens = model.generate(
        inputs["input_ids"],
        **vision_kwargs(inputs),
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=torch.Generator(device=args.device).manual_seed(args.seed),
    )
    seconds = time.perf_counter() - start
    print(processor.batch_decode(tokens, skip_special_tokens=True)[0])
    print(
        f"{tokens.shape[1]} tokens in {seconds:.2f} s ({model.kinds.count('A')} growing attention layers)",
        file=sys.stderr,
    )
    return 0
