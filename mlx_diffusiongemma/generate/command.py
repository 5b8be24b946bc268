"""The generate command, `mlx_diffusiongemma.generate` (also `python -m
mlx_diffusiongemma.generate`, through __main__.py): argument parsing, the
live terminal canvas and the statistics line."""

import argparse
import dataclasses
import os
import shutil
import sys

import mlx.core as mx

from ..arguments import ArgumentParser, checked, str2bool
from ..chat import check_text, longest_text
from ..images import SUPPORTED_SOFT_TOKENS, load_image
from ..load import load
from ..sampling import check_seed
from .events import Commit, DiffusionResponse
from .loop import stream_diffusion_generate
from .options import ACCEPTANCE, SELF_CONDITIONING, DiffusionOptions

PROG = "python -m mlx_diffusiongemma.generate"


def setup_arg_parser() -> argparse.ArgumentParser:
    """mlx_lm.generate's flags where they make sense, plus the sampler's."""
    p = ArgumentParser(prog=PROG, description="Generate text with DiffusionGemma.")
    p.add_argument("--model", required=True, help="local directory or Hugging Face repo")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", "-p", action="append", type=checked(str, _text("prompt")),
                         help="message to the model ('-' reads stdin); several --prompt are generated together, as a batch")
    prompts.add_argument("--prompts-file", metavar="FILE", help="a batch: one prompt per line (blank lines skipped)")
    p.add_argument("--system-prompt", type=checked(str, _text("system prompt")), default=None)
    p.add_argument("--image", "--images", dest="image", metavar="PATH", nargs="+", action="extend", default=None,
                   help="an image file for the prompt, before its text (several: list them or repeat the flag; "
                        "one prompt only; with --ignore-chat-template the prompt holds the image token where each goes)")
    p.add_argument("--max-soft-tokens", type=int, choices=SUPPORTED_SOFT_TOKENS, default=None, metavar="N",
                   help="soft tokens per image at most: 70, 140, 280, 560 or 1120 "
                        "(default: the checkpoint's processor config, else 280)")
    p.add_argument("--ignore-chat-template", action="store_true", help="encode the prompt raw")
    p.add_argument("--enable-thinking", action="store_true", help="let the model think before answering")
    p.add_argument("--show-thinking", action="store_true", help="print the thought channel too")
    p.add_argument("--max-tokens", "-m", type=int, default=None, help="rounded up to whole canvases")
    p.add_argument("--seed", type=checked(int, check_seed), default=None, help="an integer in [0, 2**64)")
    p.add_argument("--verbose", type=str2bool, default=True, help="live canvas and statistics (True/False)")
    g = p.add_argument_group("diffusion (defaults: the checkpoint's generation_config.json, then the reference)")
    g.add_argument("--max-denoising-steps", type=int, default=None)
    g.add_argument("--t-min", type=float, default=None)
    g.add_argument("--t-max", type=float, default=None)
    g.add_argument("--entropy-bound", type=float, default=None)
    g.add_argument("--stability-threshold", type=int, default=None)
    g.add_argument("--confidence-threshold", type=float, default=None)
    g.add_argument("--eos-token-id", type=int, nargs="*", default=None, help="none given: no eos")
    g.add_argument("--acceptance", choices=sorted(ACCEPTANCE), default=None)
    g.add_argument("--min-confidence", type=float, default=None, help="for --acceptance confidence")
    g.add_argument("--self-conditioning", choices=SELF_CONDITIONING, default=None,
                   help="top-k: feed back only the k most probable tokens (faster, approximate)")
    g.add_argument("--self-conditioning-k", type=int, default=None, metavar="K", help="for --self-conditioning top-k")
    g.add_argument("--no-fused-sampling", dest="fused_sampling", action="store_false", default=None,
                   help="on a GPU, sample with mlx ops instead of the fused kernel")
    g.add_argument("--decoder-input-ids", type=int, nargs="+", default=None,
                   help="the first canvas's start: exactly canvas_length ids (config.json)")
    return p


def _text(what: str):
    """A check for text given on the command line (not UTF-8: a usage error)."""

    def check(text: str) -> str:
        check_text(text, what)
        return text

    return check


class _LiveCanvas:
    """Redraws one terminal line: committed text, then the canvas converging."""

    def __init__(self, stream):
        self.stream = stream
        self.committed = ""

    def show(self, event) -> None:
        if isinstance(event, Commit):
            self.committed += event.text
            draft = ""
        else:
            draft = f"[{event.text}] step {event.step}, {event.accepted} accepted, entropy {event.mean_entropy:.2f}"
        width = shutil.get_terminal_size().columns - 1
        line = (self.committed + draft).replace("\n", " ")[-width:]
        self.stream.write(f"\r\033[K{line}")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()


def statistics_line(r: DiffusionResponse) -> str:
    return (
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec | "
        f"Generation: {r.generation_tokens} tokens, {r.canvases} canvases, {r.denoising_steps} denoising steps, "
        f"{r.tokens_per_forward:.2f} tokens/forward, {r.generation_tps:.3f} tokens-per-sec | "
        f"Wall: {r.wall_time:.2f} s | Peak memory: {r.peak_memory:.3f} GB"
    )


_NO_FLAG = ("pad_token_id",)  # options the command does not offer
# every other DiffusionOptions field is a flag of the same name (its dest in setup_arg_parser)
_OPTION_FLAGS = tuple(f.name for f in dataclasses.fields(DiffusionOptions) if f.name not in _NO_FLAG)


def parse_args(argv=None) -> tuple:
    """(parser, args), every check that needs no model done: a bad value is a
    usage error (exit 2) before the model loads. Token ids are checked after."""
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    try:
        DiffusionOptions.check({k: getattr(args, k) for k in _OPTION_FLAGS if getattr(args, k) is not None})
    except ValueError as e:
        parser.error(str(e))
    if args.image and (args.prompts_file is not None or len(args.prompt) > 1):
        parser.error("--image goes with a single --prompt, not a batch (the Python API's images= takes a batch's)")
    return parser, args


def batch_line(responses: list, seconds: float) -> str:
    tokens = sum(r.generation_tokens for r in responses)
    return f"Batch: {len(responses)} prompts, {tokens} tokens in {seconds:.2f} s, {tokens / seconds:.3f} tokens-per-sec"


def _read_prompts(args, tokenizer, context: int) -> list:
    """The prompts as given: --prompt (each, or '-' for stdin) or one per line
    of --prompts-file. Standard input longer than any prompt that fits the
    context is refused without reading the rest (UTF-8: at most 4 bytes a
    character)."""
    if args.prompts_file is None:
        limit = 4 * longest_text(tokenizer, context) if tokenizer is not None else None
        return [_read_text(sys.stdin.buffer, "standard input", limit) if p == "-" else p for p in args.prompt]
    with open(args.prompts_file, "rb") as f:
        prompts = [line for line in _read_text(f, args.prompts_file).splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{args.prompts_file} holds no prompt (one per line)")
    return prompts


def _read_text(stream, name: str, limit=None) -> str:
    """UTF-8 text from a binary stream (at most `limit` bytes), with an error naming the source."""
    data = stream.read() if limit is None else stream.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise ValueError(f"{name} holds more than {limit} bytes: more than a prompt that fits the model's context")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def _check_images(paths: list) -> None:
    """Each image read once before the model loads, so a missing or corrupt
    file (or no Pillow) fails fast; the generation reads them again."""
    for path in paths:
        try:
            load_image(path)
        except ImportError as e:  # no Pillow: the message names the extra
            raise ValueError(str(e)) from None


def main(argv=None) -> int:
    """The command: one line and an exit code for what stops it (1 for a bad
    file or model-dependent value, 130 for Ctrl-C; a reader that stops
    reading, as `| head` does, ends it quietly with 141, as SIGPIPE would)."""
    try:
        return _generate(argv)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # what is still buffered for stdout has nowhere to go: drop it, so the
        # interpreter's flush at exit does not print a second error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _generate(argv) -> int:
    parser, args = parse_args(argv)
    options = {name: getattr(args, name) for name in _OPTION_FLAGS}
    if args.seed is not None:
        mx.random.seed(args.seed)  # as mlx_lm.generate does: same seed, same draws, same text
    # Under mlx.launch every rank runs this command: the model is sharded
    # across them, all generate the same tokens, and rank 0 prints them.
    group = mx.distributed.init()
    printing = group.rank() == 0
    responses, live = {}, None
    try:
        _check_images(args.image or [])
        model, tokenizer = load(args.model, tensor_group=group if group.size() > 1 else None)
        prompts = _read_prompts(args, tokenizer, model.args.max_position_embeddings)
        tty = printing and args.verbose and sys.stdout.isatty()
        live = _LiveCanvas(sys.stdout) if tty and len(prompts) == 1 else None
        events = stream_diffusion_generate(
            model,
            tokenizer,
            prompts[0] if len(prompts) == 1 else prompts,
            system_prompt=args.system_prompt,
            enable_thinking=args.enable_thinking,
            use_chat_template=not args.ignore_chat_template,
            decoder_input_ids=args.decoder_input_ids,
            images=args.image,
            max_soft_tokens=args.max_soft_tokens,
            **options,
        )
        for event in events:
            if isinstance(event, DiffusionResponse):
                responses[event.row] = event
            elif live is not None:
                live.show(event)
    except (ValueError, OSError) as e:
        if live is not None:
            live.clear()
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    if live is not None:
        live.clear()
    if not printing:
        return 0
    for row in sorted(responses):
        response = responses[row]
        if len(responses) > 1:
            print(f"[{row}]")
        if args.show_thinking and response.thinking:
            print(f"Thinking:\n{response.thinking}\n\nAnswer:")
        print(response.text)
        if args.verbose:
            print(statistics_line(response))
    if args.verbose and len(responses) > 1:
        print(batch_line(list(responses.values()), max(r.wall_time for r in responses.values())))
    return 0
