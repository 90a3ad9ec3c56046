"""The `tokenloom` command: generate, chat, translate, summarize, serve, pull, models, bench. Each subcommand calls into the library.

Generation flags are made from GenerationConfig's fields, so every generation parameter is a
flag with its description and range in --help. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing

from tokenloom.config import GenerationConfig
from tokenloom.errors import PromptError, TokenloomError

EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's status for a command line it cannot parse


class Parser(argparse.ArgumentParser):
    """argparse, but a command line it cannot parse is reported in one line, like every other error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"tokenloom: error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------------------------- generation flags
# One flag per GenerationConfig field, its argparse settings derived from the field's type:
#   bool -> --x / --no-x;  int, float, str -> one value;  list[T] -> repeatable;
#   list[list[int]] -> repeatable comma-separated ids;  dict[K, V] -> repeatable KEY=VALUE.


def _number(text: str) -> int | float:
    """An int when the text is one (fields such as [start, factor] want an int first), else a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _bool_or_str(text: str) -> bool | str:
    return {"true": True, "false": False}.get(text.lower(), text)


def _comma_list(item_type):
    def parse(text: str) -> list:
        return [item_type(x) for x in text.split(",") if x.strip()]
    parse.__name__ = f"comma-separated {item_type.__name__} list"  # argparse names it in errors
    return parse


def _key_value(key_type, value_type):
    def parse(text: str) -> tuple:
        key, sep, value = text.partition("=")
        if not sep:
            raise ValueError(text)
        return key_type(key.strip()), value_type(value.strip())
    parse.__name__ = "KEY=VALUE pair"
    return parse


def _scalar(t):
    return _number if t is float else t


def _flag_type(name: str) -> tuple[dict, str]:
    """(argparse kwargs, a note on the value format for --help) for a GenerationConfig field."""
    ann = typing.get_type_hints(GenerationConfig)[name]
    args = [a for a in typing.get_args(ann) if a is not type(None)] if isinstance(ann, types.UnionType) else [ann]
    if set(args) == {bool}:
        return {"action": argparse.BooleanOptionalAction}, ""
    if set(args) == {bool, str}:
        return {"type": _bool_or_str, "metavar": "VALUE"}, ""
    base = args[0]
    origin, item_types = typing.get_origin(base), typing.get_args(base)
    if origin is list and typing.get_origin(item_types[0]) is list:
        (inner,) = typing.get_args(item_types[0])
        return ({"action": "append", "type": _comma_list(_scalar(inner)), "metavar": "IDS"},
                "Repeatable; each value comma-separated, e.g. 5,6.")
    if origin is list:
        return {"action": "append", "type": _scalar(item_types[0])}, "Repeatable: one value per flag."
    if origin is dict:
        key_t, value_t = (_scalar(t) for t in item_types)
        return ({"action": "append", "type": _key_value(key_t, value_t), "metavar": "KEY=VALUE"},
                "Repeatable: one KEY=VALUE pair per flag.")
    return {"type": _scalar(base)}, ""


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation parameters (default: the model's generation_config, then ours)")
    for name, default, allowed, doc in GenerationConfig.describe():
        flags = ["--" + name.replace("_", "-")]
        if name == "num_return_sequences":
            flags.append("-n")
        kwargs, note = _flag_type(name)
        if "action" not in kwargs or kwargs["action"] == "append":
            kwargs.setdefault("metavar", name.upper())
        shown = "model default" if default is None else json.dumps(default)
        text = " ".join(x for x in (doc, note, f"Allowed: {allowed}.", f"Default: {shown}.") if x)
        group.add_argument(*flags, dest=name, default=None, help=text.replace("%", "%%"), **kwargs)


def generation_params(args: argparse.Namespace) -> dict:
    """The generation flags given on the command line, as GenerationConfig fields."""
    params = {}
    for name in GenerationConfig.field_names():
        value = getattr(args, name, None)
        if value is None:
            continue
        if isinstance(value, list) and value and isinstance(value[0], tuple):  # KEY=VALUE pairs
            value = dict(value)
        params[name] = value
    return params


def add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="activation dtype, and weight dtype of unquantized weights (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4", "w8a8"],
                   help="weights packed as int4/int8 on CPU: auto = as a quantized GGUF file stores them "
                        "(float checkpoints stay float), none = expand to --dtype, int8/int4 = quantize the "
                        "weights at load, w8a8 = int8 weights x int8 activations (FBGEMM), 8-bit weights at "
                        "about twice int4's memory (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    from tokenloom.loading.registry import DEFAULT_MODEL

    parser = Parser(prog="tokenloom", description="Local text generation with pretrained language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="continue a prompt", description=(
        "Continue PROMPT (or standard input) with a language model, streaming the text as it is generated."))
    gen.add_argument("prompt", nargs="?", help="the prompt; read from standard input when absent or '-' "
                     "(one trailing newline removed)")
    gen.add_argument("-m", "--model", default=DEFAULT_MODEL,
                     help=f"registry name, checkpoint folder, .gguf file or Hugging Face Hub id (default: {DEFAULT_MODEL})")
    add_load_flags(gen)
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per returned sequence (text, token_ids, finish_reason, ...) instead of streaming text")
    gen.add_argument("--allow-pickle", action="store_true",
                     help="allow pickle checkpoints (pytorch_model.bin); loaded with weights_only=True")
    add_generation_flags(gen)

    chat = sub.add_parser("chat", help="talk with a model in the terminal", description=(
        "An interactive conversation through the model's chat template, the reply streamed as it is generated. "
        "Commands: /reset, /help, /quit (or /exit, or Ctrl-D); Ctrl-C stops a reply. When standard input is "
        "not a terminal, each line is one user message and only the replies are printed."))
    chat.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"the model (default: {DEFAULT_MODEL})")
    chat.add_argument("--system", help="system prompt, kept across /reset")
    add_load_flags(chat)
    chat.add_argument("--allow-pickle", action="store_true",
                      help="allow pickle checkpoints (pytorch_model.bin); loaded with weights_only=True")
    add_generation_flags(chat)

    for name, helptext in (("translate", "translate text"), ("summarize", "summarize text")):
        task = sub.add_parser(name, help=helptext, description=(
            f"{helptext.capitalize()} with an encoder-decoder model (T5, BART, mBART, Marian) or a decoder-only one "
            "(through an instruction and its chat template). Without TEXT, each line of --file or of standard "
            "input is one text; one result is printed per line."))
        task.add_argument("text", nargs="?", help="the text; otherwise lines of --file or standard input")
        task.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"the model (default: {DEFAULT_MODEL})")
        task.add_argument("-f", "--file", help="read texts from this file, one per line")
        if name == "translate":
            task.add_argument("--source", help="source language (code such as en, or mBART's en_XX)")
            task.add_argument("--target", help="target language (code such as de, or mBART's de_DE)")
        add_load_flags(task)
        task.add_argument("--json", action="store_true", help="print one JSON object per text")
        add_generation_flags(task)

    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", description=(
        "Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, "
        "/health and /metrics. Requests are batched continuously. SIGTERM or Ctrl-C stops taking requests, "
        "finishes those in flight, then exits."))
    srv.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"the model (default: {DEFAULT_MODEL})")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    srv.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together (default: 32)")
    srv.add_argument("--max-queue", type=int, default=256,
                     help="most requests waiting for the batch; more get HTTP 429 (default: 256)")
    srv.add_argument("--max-body-bytes", type=int, default=1 << 20,
                     help="largest request body; larger get HTTP 413 (default: 1048576)")
    srv.add_argument("--served-model-name", help="the model's name in the API (default: the model's own)")
    add_load_flags(srv)
    srv.add_argument("--allow-pickle", action="store_true",
                     help="allow pickle checkpoints (pytorch_model.bin); loaded with weights_only=True")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    pull = sub.add_parser("pull", help="download a model from the built-in registry into the local cache")
    pull.add_argument("name", help="registry name (see `tokenloom models`)")

    sub.add_parser("models", help="list the registry and the models in the local cache")

    from tokenloom import bench
    bench.add_arguments(sub.add_parser("bench", help="tok/s and memory of tokenloom, transformers and llama.cpp side by side",
                                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def read_prompt(args) -> str:
    """The prompt argument, else standard input without the newline `echo` adds."""
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise PromptError("no prompt: give one as an argument or on standard input")
        try:
            prompt = sys.stdin.read()
        except UnicodeDecodeError as e:
            raise PromptError(f"standard input is not valid {e.encoding} text (byte {e.start})") from None
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
        prompt = prompt[:-1] if prompt.endswith("\r") else prompt
    if not prompt:
        raise PromptError("the prompt is empty")
    return prompt


def generation_json(g) -> str:
    """One returned sequence as a JSON line: the Generation's fields (index and text first).

    U+0085, U+2028 and U+2029 are escaped too: `str.splitlines()` and some JSON-lines readers
    would split the line there."""
    record = {"index": g.index, "text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason,
              "prompt_tokens": g.prompt_tokens}
    record.update({k: v for k, v in dataclasses.asdict(g).items() if k not in record})
    line = json.dumps(record, ensure_ascii=False)
    return line.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def cmd_generate(args) -> int:
    import tokenloom
    from tokenloom.loading.resolve import resolve_model

    params = generation_params(args)
    GenerationConfig.from_dict(params)  # refuse bad values before spending time loading the model
    prompt = read_prompt(args)
    resolve_model(args.model)  # a missing or unrecognised model fails now, before torch is imported
    model = tokenloom.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, allow_pickle=args.allow_pickle)
    if args.json:
        for g in model.generate([prompt], **params):
            print(generation_json(g), flush=True)
        return 0
    stream_to_terminal(model.stream(prompt, **params), sys.stdout)
    return 0


CHAT_HELP = """commands:
  /reset         forget the conversation (the system prompt stays)
  /quit, /exit   leave (Ctrl-D too)
  /help          this list
Ctrl-C stops the reply being written."""


def read_chat_line(interactive: bool) -> str | None:
    """One user message; None at the end of input. On a terminal, Ctrl-C at the prompt gives a new prompt."""
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        while True:
            try:
                return input("> ")
            except EOFError:
                print()
                return None
            except KeyboardInterrupt:
                print("\n(/quit or Ctrl-D leaves)", file=sys.stderr)
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def chat_reply(model, messages: list[dict], params: dict) -> str:
    """Stream the reply to `messages` to the terminal; return the text of sequence 0."""
    texts = []

    def keep(deltas):
        for d in deltas:
            if d.index == 0:
                texts.append(d.text)
            yield d

    deltas = model.stream_chat(messages, **params)
    try:
        stream_to_terminal(keep(deltas), sys.stdout)
    except BaseException:  # a reply cut short (Ctrl-C, an error) still ends its line
        if any(texts):
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    finally:
        deltas.close()
    return "".join(texts)


def cmd_chat(args) -> int:
    import tokenloom
    from tokenloom.loading.resolve import resolve_model
    from tokenloom.tokenizer.chat_template import ChatTemplateError

    params = generation_params(args)
    GenerationConfig.from_dict(params)
    resolve_model(args.model)
    model = tokenloom.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, allow_pickle=args.allow_pickle)
    if not model.tokenizer.chat_template:
        raise ChatTemplateError(f"{model.name} has no chat template; `tokenloom generate` continues plain text")
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {model.name}. /help lists the commands.", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    while (line := read_chat_line(interactive)) is not None:
        if not line.strip():
            continue
        command = line.split()[0].lower() if line.lstrip().startswith("/") else None
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            history = list(system)
            print("(conversation cleared)", file=sys.stderr)
        elif command == "/help":
            print(CHAT_HELP, flush=True)
        elif command is not None:
            print(f"tokenloom: unknown command {command} (/help lists them)", file=sys.stderr)
        else:
            messages = history + [{"role": "user", "content": line}]
            try:
                reply = chat_reply(model, messages, params)
            except TokenloomError as e:  # this turn failed (too long, template refused it): the chat goes on
                sys.stdout.flush()
                print(f"tokenloom: error: {e}", file=sys.stderr, flush=True)
                continue
            except KeyboardInterrupt:  # the turn is dropped, so the model never sees a cut reply
                print("(reply stopped)", file=sys.stderr, flush=True)
                continue
            history = messages + [{"role": "assistant", "content": reply}]
    return 0


def read_texts(args) -> list[str]:
    """TEXT, or the non-empty lines of --file / standard input."""
    if args.text is not None:
        if not args.text.strip():
            raise PromptError("the text is empty")
        return [args.text]
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise PromptError(f"cannot read {args.file}: {e}") from None
    elif sys.stdin is None or sys.stdin.isatty():
        raise PromptError("no text: give it as an argument, with --file, or on standard input")
    else:
        lines = sys.stdin.read().splitlines()
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise PromptError("no text to process: the input is empty")
    return texts


def cmd_task(args) -> int:
    import tokenloom
    from tokenloom.loading.resolve import resolve_model

    params = generation_params(args)
    GenerationConfig.from_dict(params)
    texts = read_texts(args)
    resolve_model(args.model)
    model = tokenloom.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    for text in texts:  # one at a time, so results appear as they are ready
        if args.command == "translate":
            out = model.translate(text, source=args.source, target=args.target, **params)
        else:
            out = model.summarize(text, **params)
        print(json.dumps({"input": text, "output": out}, ensure_ascii=False) if args.json else out, flush=True)
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


def cmd_serve(args) -> int:
    import tokenloom
    from tokenloom.loading.resolve import resolve_model

    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-body-bytes", args.max_body_bytes)):
        if value < 1:
            raise TokenloomError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise TokenloomError(f"--port must be in [0, 65535], got {args.port}")
    try:
        from tokenloom.server import serve
    except ImportError as e:
        raise TokenloomError(f"the server needs fastapi and uvicorn ({e}); pip install fastapi uvicorn") from None
    resolve_model(args.model)
    model = tokenloom.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, allow_pickle=args.allow_pickle)
    serve(model, args.host, args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          max_body_bytes=args.max_body_bytes, model_name=args.served_model_name, log_level=args.log_level)
    return 0


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


def cmd_bench(args) -> int:
    from tokenloom import bench

    return bench.run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"generate": cmd_generate, "chat": cmd_chat, "translate": cmd_task, "summarize": cmd_task, "pull": cmd_pull,
                    "models": cmd_models, "serve": cmd_serve, "bench": cmd_bench}
        status = commands[args.command](args)
        sys.stdout.flush()  # a reader that left shows up here, not in Python's flush at exit
        return status
    except TokenloomError as e:
        print(f"tokenloom: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader left (`| head`): stop quietly, and keep Python from failing to flush stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - users get one line; TOKENLOOM_DEBUG=1 shows the traceback
        if os.environ.get("TOKENLOOM_DEBUG"):
            raise
        message = " ".join(str(e).split())  # one line, whatever the exception says
        print(f"tokenloom: internal error: {type(e).__name__}: {message} (set TOKENLOOM_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
