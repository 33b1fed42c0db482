"""``hybridvl stream``: feed a video frame by frame into a model's fixed-size state and answer questions on the way.

    hybridvl stream --model student --video match.mp4 --fps 2 --ask "10:What is on screen?" --ask "60:Who scored?"

``--ask FRAME:QUESTION`` asks after that many frames (counting from 1); every answer forks the state, so the
stream continues untouched. On a GPU frames and answers run as CUDA graphs (``--no-cuda-graphs``: eagerly), with
``--compile`` compiled first. Prints each answer with its timing, then the stream's throughput (frames per second
fed, their preprocessing included) and state size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from hybridvl.lit.cli import ArgumentParser, device_argument
from hybridvl.lit.commands.generate import check_answer_length
from hybridvl.lit.commands.layout import format_bytes
from hybridvl.models.chat import load_processor
from hybridvl.models.generation import check_generation_options
from hybridvl.models.hybrid import HybridVLM
from hybridvl.models.streaming import StreamingSession
from hybridvl.vision import iter_video_frames


def parse_ask(text: str) -> tuple[int, str]:
    frame, sep, question = text.partition(":")
    if not sep or not frame.strip().isdigit() or int(frame) < 1 or not question.strip():
        raise argparse.ArgumentTypeError(f"--ask takes FRAME:QUESTION with FRAME >= 1, got {text!r}")
    return int(frame), question.strip()


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="hybridvl stream", description=__doc__)
    parser.add_argument("--model", required=True, help="model directory (with its processor files)")
    parser.add_argument("--video", required=True, type=Path, help="a video file")
    parser.add_argument("--ask", type=parse_ask, action="append", default=[], help="FRAME:QUESTION (repeatable)")
    parser.add_argument("--fps", type=float, default=2.0, help="frames per second to sample")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens")
    parser.add_argument(
        "--device",
        type=device_argument,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda, cuda:N or mps",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="feed frames and decode answers by CUDA-graph replay (default: on a CUDA device, for layouts without A)",
    )
    parser.add_argument("--compile", action="store_true", help="compile the forward the CUDA graphs capture")
    args = parser.parse_args(argv)
    try:
        check_generation_options(args.max_new_tokens)
    except ValueError as error:
        parser.error(str(error))
    for flag, given in (("--cuda-graphs", args.cuda_graphs), ("--compile", args.compile)):
        if given and args.device.type != "cuda":
            parser.error(f"{flag} needs a CUDA device, not --device {args.device}")
    if args.compile and args.cuda_graphs is False:
        parser.error("--compile compiles the forward the CUDA graphs capture: drop --no-cuda-graphs")
    frames = iter_video_frames(args.video, args.fps)
    model = HybridVLM.from_pretrained(args.model, device_map=args.device)
    graphs = args.cuda_graphs
    if graphs is None:
        graphs = args.device.type == "cuda" and "A" not in model.kinds
    if args.compile and not graphs:
        parser.error("--compile needs CUDA graphs, which stream only layouts without full-attention (A) layers")
    processor = load_processor(args.model)
    check_answer_length(processor.tokenizer, args.max_new_tokens)
    session = StreamingSession(model, processor, cuda_graphs=graphs, compile=args.compile)
    asks = sorted(args.ask)
    start, feeding = time.perf_counter(), 0.0
    for timestamp, frame in frames:
        tick = time.perf_counter()
        session.feed_frame(frame)
        feeding += time.perf_counter() - tick
        while asks and asks[0][0] == session.frames:
            _, question = asks.pop(0)
            answer = session.ask(question, args.max_new_tokens)
            print(
                f"[frame {session.frames}, {timestamp:.1f} s] {question}\n  {answer.text}\n"
                f"  ({answer.tokens} tokens in {answer.seconds * 1000:.0f} ms)"
            )
    for frame, question in asks:
        print(f"not asked: {question!r} (the video has {session.frames} frames at {args.fps} fps, not {frame})")
    fps = session.frames / feeding if feeding else 0.0
    print(
        f"{session.frames} frames, {session.tokens} tokens in {time.perf_counter() - start:.1f} s "
        f"({fps:.1f} frames/s fed); state {format_bytes(session.state_bytes)}",
        file=sys.stderr,
    )
    return 0
