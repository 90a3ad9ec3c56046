"""The `tokenloom` command: generate, pull, models. Each subcommand calls into the library.

Generation flags are made from GenerationConfig's fields, so every generation parameter is a
flag with its description and range in --help. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing

from tokenloom.config import GenerationConfig
from tokenloom.errors import TokenloomError

EXIT_ERROR = 1


def _flag_type(annotation):
    """(argparse kwargs) for a GenerationConfig field annotation."""
    ann = typing.get_type_hints(GenerationConfig)[annotation]
    args = [a for a in typing.get_args(ann) if a is not type(None)] if isinstance(ann, types.UnionType) else [ann]
    base = args[0] if args else ann
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is list:
        return {"action": "append", "type": typing.get_args(base)[0]}
    return {"type": base}


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation parameters (default: the model's generation_config, then ours)")
    for name, default, allowed, doc in GenerationConfig.describe():
        flags = ["--" + name.replace("_", "-")]
        if name == "num_return_sequences":
            flags.append("-n")
        kwargs = _flag_type(name)
        shown = "model default" if default is None else default
        metavar = {} if "action" in kwargs and kwargs["action"] != "append" else {"metavar": name.upper()}
        group.add_argument(*flags, dest=name, default=None, help=f"{doc} Allowed: {allowed}. Default: {shown}.",
                           **kwargs, **metavar)


def generation_params(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in GenerationConfig.field_names() if getattr(args, name) is not None}


def build_parser() -> argparse.ArgumentParser:
    from tokenloom.loading.registry import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="tokenloom", description="Local text generation with pretrained language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="continue a prompt", description=(
        "Continue PROMPT (or standard input) with a language model, streaming the text as it is generated."))
    gen.add_argument("prompt", nargs="?", help="the prompt; read from standard input when absent")
    gen.add_argument("-m", "--model", default=DEFAULT_MODEL,
                     help=f"registry name, checkpoint folder, .gguf file or Hugging Face Hub id (default: {DEFAULT_MODEL})")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="weight and activation dtype (default: float32)")
    gen.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per returned sequence (text, token_ids, finish_reason, ...) instead of streaming text")
    gen.add_argument("--allow-pickle", action="store_true",
                     help="allow pickle checkpoints (pytorch_model.bin); loaded with weights_only=True")
    add_generation_flags(gen)

    pull = sub.add_parser("pull", help="download a model from the built-in registry into the local cache")
    pull.add_argument("name", help="registry name (see `tokenloom models`)")

    sub.add_parser("models", help="list the registry and the models in the local cache")
    return parser


def cmd_generate(args) -> int:
    import tokenloom

    params = generation_params(args)
    GenerationConfig.from_dict(params)  # refuse bad values before spending time loading the model
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise TokenloomError("no prompt: give one as an argument or on standard input")
        prompt = sys.stdin.read()
    model = tokenloom.load(args.model, dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle)
    if args.json:
        results = model.generate([prompt], **params)
        for g in results:
            print(json.dumps({"index": g.index, "text": g.text, "token_ids": g.token_ids,
                              "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens},
                             ensure_ascii=False), flush=True)
        return 0
    stream_to_terminal(model.stream(prompt, **params), sys.stdout)
    return 0


def stream_to_terminal(deltas, out) -> None:
    """Print sequence 0 live; later sequences are buffered and shown (then live) in turn."""
    current, buffers, finished, headed = 0, {}, set(), set()

    def show(index: int, text: str) -> None:
        if index > 0 and index not in headed:
            headed.add(index)
            out.write(f"\n\n--- sequence {index + 1} ---\n")
        out.write(text)
        out.flush()

    for d in deltas:
        if d.index == current:
            show(current, d.text)
        else:
            buffers[d.index] = buffers.get(d.index, "") + d.text
        if d.finish_reason is not None:
            finished.add(d.index)
        while current in finished:
            current += 1
            if current in buffers:
                show(current, buffers.pop(current))
    for index in sorted(buffers):
        show(index, buffers[index])
    out.write("\n")
    out.flush()


def cmd_pull(args) -> int:
    from tokenloom.loading.registry import pull

    path = pull(args.name, progress=True)
    print(path)
    return 0


def cmd_models(args) -> int:
    from tokenloom.loading.registry import DEFAULT_MODEL, list_local, registry_names

    local = {m.name: m for m in list_local()}
    print(f"{'NAME':<28} {'SIZE':>10}  LOCATION")
    for name in registry_names():
        m = local.pop(name, None)
        size = f"{m.size / 1e6:.0f} MB" if m else "-"
        where = str(m.path) if m else "not pulled (tokenloom pull " + name + ")"
        print(f"{name + (' *' if name == DEFAULT_MODEL else ''):<28} {size:>10}  {where}")
    for name, m in local.items():
        print(f"{name:<28} {m.size / 1e6:>7.0f} MB  {m.path}")
    print("* default model")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "pull": cmd_pull, "models": cmd_models}[args.command](args)
    except TokenloomError as e:
        print(f"tokenloom: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - users get one line; TOKENLOOM_DEBUG=1 shows the traceback
        if os.environ.get("TOKENLOOM_DEBUG"):
            raise
        print(f"tokenloom: internal error: {type(e).__name__}: {e} (set TOKENLOOM_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
