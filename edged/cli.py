"""Command line: `edged run|pull|convert|list|show|rm|serve|ask|status`.

Argument handling and printing only; what the commands do lives in edged.models,
edged.engine and edged.serve. Options may come before, between and after a
command's positionals, as `ollama run` takes them. Errors are one line on stderr
and a non-zero exit; --debug shows tracebacks. Conversion imports stay inside
their commands so `edged --help` and the runtime commands work without the
convert extra.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edged import __version__
from edged.errors import EdgedError


def _progress():
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


def _store(args):
    from edged.models.store import ModelStore

    return ModelStore()


def cmd_pull(args) -> int:
    from edged.models.registry import pull

    done = pull(args.model, target=args.target, scheme=args.scheme, store=_store(args), progress=_progress())
    if done.action == "converted":
        _print_gate(done.model.manifest)
        print(f"pulled {args.model} -> {done.model.path}")
    elif done.action == "defaults":
        print(f"{args.model} is up to date ({done.model.path}); generation defaults set to {_defaults(done.model.manifest)}")
    else:
        print(f"{args.model} is up to date ({done.model.path})")
    return 0


def cmd_convert(args) -> int:
    from edged.models.convert import convert
    from edged.models.store import sha256_file

    src = Path(args.source)
    info = {"sha256": sha256_file(src)} if src.is_file() else {}
    model = convert(
        src, args.name, target=args.target, scheme=args.scheme, store=_store(args), progress=_progress(), source_info=info
    )
    _print_gate(model.manifest)
    print(f"converted {args.source} -> {model.name} ({model.path})")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cmd_list(args) -> int:
    models = _store(args).list()
    if args.json:
        print(json.dumps([{"name": m.name, **_summary(m)} for m in models], indent=2))
        return 0
    print(f"{'NAME':<24}{'QUANT':<16}{'TARGET':<8}{'SIZE':>10}  {'GATE':<10}CREATED")
    for m in models:
        s = _summary(m)
        print(f"{m.name:<24}{s['quantization']:<16}{s['target']:<8}{_human(s['size']):>10}  {s['gate']:<10}{s['created']}")
    return 0


def _summary(m) -> dict:
    man = m.manifest
    return {
        "quantization": man["quantization"]["scheme"],
        "target": man["target"],
        "size": m.size_bytes,
        "gate": man.get("gate", {}).get("status", "?"),
        "created": man.get("created", ""),
    }


def _defaults(man: dict) -> str:
    d = man.get("generation_defaults") or {}
    if not d:
        return "none (Ollama's option defaults apply)"
    return ", ".join(f"{k} {v}" for k, v in d.items())


def _print_gate(man: dict) -> None:
    g = man.get("gate", {})
    if g.get("status") in ("passed", "failed"):
        print(
            f"quality gate: {g['status']}: perplexity ratio {g['perplexity_ratio']:.4f} "
            f"({man.get('quantization', {}).get('precision', 'int8')} {g['perplexity_int8']:.3f} / fp32 {g['perplexity_fp32']:.3f}, "
            f"max {g['thresholds']['max_perplexity_ratio']}), "
            f"agreement {g['agreement']:.4f} over {g['agreement_tokens']} tokens (min {g['thresholds']['min_agreement']})"
        )
    else:
        print(f"quality gate: {g.get('status', 'unknown')}: {g.get('reason', '')}")


def cmd_show(args) -> int:
    store = _store(args)
    m = store.get(args.model)
    if args.verify:
        store.verify(m, mode="full")
    man = m.manifest
    if args.json:
        print(json.dumps(man, indent=2))
        return 0
    q = man["quantization"]
    print(f"  name            {m.name}")
    print(f"  path            {m.path}")
    print(f"  architecture    {man['architecture']}")
    print(f"  source          {man['source'].get('description') or man['source']['path']}")
    print(f"  target          {man['target']}")
    print(f"  quantization    {q['scheme']}")
    print(f"  context length  {man['context_length']}")
    print(f"  size            {_human(m.size_bytes)}")
    print(f"  created         {man.get('created')}")
    print(f"  defaults        {_defaults(man)}")
    print("  ", end="")
    _print_gate(man)
    if args.verify:
        print("  files           verified (sha256)")
    return 0


def cmd_rm(args) -> int:
    _store(args).remove(args.model)
    print(f"deleted {args.model}")
    return 0


# Request options with an Ollama flag: (flag, option name, type, help).
OPTION_FLAGS = (
    ("--temperature", "temperature", float, "sampling temperature; 0 = greedy"),
    ("--top-k", "top_k", int, None),
    ("--top-p", "top_p", float, None),
    ("--min-p", "min_p", float, None),
    ("--repeat-penalty", "repeat_penalty", float, None),
    ("--seed", "seed", int, None),
    ("--num-predict", "num_predict", int, "most tokens to generate (-1: until the end)"),
    ("--num-ctx", "num_ctx", int, "context tokens to use"),
)


def _add_request_flags(p: argparse.ArgumentParser) -> None:
    """The request flags `run` and `ask` share: options (unset ones leave the model's defaults) and --system."""
    p.add_argument("--system", help="system message")
    g = p.add_argument_group("request options (unset: the model's defaults, see `edged show`)")
    for flag, dest, typ, help in OPTION_FLAGS:
        g.add_argument(flag, dest=dest, type=typ, help=help)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument(
        "--format",
        metavar="json|@FILE|SCHEMA",
        help="answer in JSON: 'json' (any object), @schema.json or an inline JSON schema; "
        "the prompt should ask for it (docs/protocol.md)",
    )


def _request_options(args) -> dict:
    """The `options` object of a request from the flags given on the command line."""
    opts = {dest: getattr(args, dest) for _, dest, _, _ in OPTION_FLAGS if getattr(args, dest) is not None}
    if args.stop:
        opts["stop"] = args.stop
    return opts


def _request_format(args) -> str | dict | None:
    """--format: "json", @FILE holding a JSON schema, or the schema itself."""
    value = args.format
    if value is None or value == "json":
        return value
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text()
        except OSError as e:
            raise EdgedError(f"--format: cannot read {value[1:]}: {e.strerror}") from None
    try:
        schema = json.loads(value)
    except ValueError as e:
        raise EdgedError(f"--format: not 'json' and not a JSON schema: {e}") from None
    if not isinstance(schema, dict):
        raise EdgedError("--format: a JSON schema must be a JSON object")
    return schema


def _read_prompt(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def cmd_run(args) -> int:
    from edged.engine.request import GenerateRequest
    from edged.engine.runner import EngineConfig
    from edged.models.loading import load_engine

    fmt = _request_format(args)  # before the model loads: a bad schema fails fast
    if fmt is not None:
        GenerateRequest.from_dict({"prompt": "", "format": fmt})
    engine = load_engine(args.model, config=EngineConfig(threads=args.threads))
    opts = _request_options(args)
    if args.prompt is not None:
        req = GenerateRequest.from_dict(
            {"prompt": _read_prompt(args.prompt), "system": args.system, "raw": args.raw, "options": opts, "format": fmt}
        )
        _stream(engine, req, args.verbose)
        return 0
    return _chat(engine, args, opts)


def _stream(engine, req, verbose: bool) -> str:
    gen = engine.generate(req)
    tty = sys.stdout.isatty()
    try:
        for delta in gen:
            if tty:
                sys.stdout.write(delta)
                sys.stdout.flush()
    except KeyboardInterrupt:
        gen.cancel.set()
    if not tty:
        sys.stdout.write(gen.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose and gen.stats:
        s = gen.stats
        rate = s["eval_count"] / (s["eval_duration"] / 1e9) if s["eval_duration"] else 0.0
        print(
            f"prompt {s['prompt_eval_count']} tokens in {s['prompt_eval_duration'] / 1e6:.0f} ms; "
            f"{s['eval_count']} tokens at {rate:.1f} tok/s; done: {s['done_reason']}",
            file=sys.stderr,
        )
    return gen.text


def _chat(engine, args, opts) -> int:
    from edged.engine.request import GenerateRequest

    fmt = _request_format(args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"edged {__version__}, model {engine.model.name}. Type /bye or Ctrl-D to leave.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return 0
        if text == "/clear":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        req = GenerateRequest.from_dict({"messages": messages, "options": opts, "format": fmt})
        try:
            answer = _stream(engine, req, args.verbose)
        except EdgedError as e:
            messages.pop()
            print(f"error: {e.message}", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": answer})


def cmd_serve(args) -> int:
    import logging
    import os

    from edged.serve.config import Config
    from edged.serve.server import run

    path = args.config or os.environ.get("EDGED_CONFIG")
    cfg = Config.load(path)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run(cfg)


def _socket_path(args) -> str:
    import os

    from edged.serve.config import default_socket_path

    return args.socket or os.environ.get("EDGED_SOCKET") or default_socket_path()


def cmd_ask(args) -> int:
    req: dict = {"prompt": _read_prompt(args.prompt), "stream": not args.no_stream}
    if args.system:
        req["system"] = args.system
    opts = _request_options(args)
    if opts:
        req["options"] = opts
    fmt = _request_format(args)
    if fmt is not None:
        req["format"] = fmt

    def show(frame: dict) -> None:
        if args.json:
            print(json.dumps(frame), flush=True)
        elif "delta" in frame:
            sys.stdout.write(frame["delta"])
            sys.stdout.flush()

    if args.mqtt:
        from edged.serve.client import mqtt_request

        host, _, port = args.mqtt.partition(":")
        if not args.node:
            raise EdgedError("--mqtt needs --node NODE (the daemon's mqtt.node)")
        topic = f"{args.prefix}/{args.node}/request"
        final = mqtt_request(host, int(port or 1883), topic, req, timeout=args.timeout, on_frame=show)
    else:
        from edged.serve.client import SocketClient

        with SocketClient(_socket_path(args), timeout=args.timeout) as c:
            final = None
            for frame in c.request(req):
                if frame.get("done"):
                    final = frame
                else:
                    show(frame)
    if args.json:
        print(json.dumps(final), flush=True)
    if "error" in final:
        if not args.json:
            print(f"edged: error: {final['error'].get('code')}: {final['error'].get('message')}", file=sys.stderr)
        return 1
    if not args.json:
        if not req["stream"]:
            sys.stdout.write(final.get("response", ""))
        sys.stdout.write("\n")
    return 0


def cmd_status(args) -> int:
    from edged.serve.client import SocketClient

    with SocketClient(_socket_path(args), timeout=30) as c:
        final = c.call({"op": "status"})
    if "error" in final:
        raise EdgedError(final["error"].get("message", "status failed"))
    st = final["status"]
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    for key, value in st.items():
        if key == "rss_bytes" and value:
            value = _human(value)
        elif isinstance(value, dict):
            value = json.dumps(value)
        print(f"  {key:<20}{value}")
    return 0


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser that takes options before, between and after its positionals
    (`edged run MODEL --temperature 0 PROMPT`). Plain argparse stops filling positionals at
    the first option, so the prompt after it would be an unrecognized argument.

    The top-level parser calls its subcommand's parse_known_args; this answers with
    parse_known_intermixed_args, which itself calls parse_known_args (twice) for the
    options and then the positionals: those inner calls take the plain path."""

    _mixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._mixing:
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def build_parser() -> argparse.ArgumentParser:
    from edged.models.quantize import SCHEMES, TARGETS

    SCHEME_HELP = (  # noqa: N806
        f"quantization scheme ({', '.join(SCHEMES)}; default: the target's, int8-block32); "
        "int4-block32 is 4-bit, smaller and faster, behind the same quality gate (docs/models.md)"
    )
    p = argparse.ArgumentParser(prog="edged", description="On-device language models for Raspberry Pi class boards.")
    p.add_argument("--version", action="version", version=f"edged {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    # --debug is also taken after the command; SUPPRESS keeps the top level's value when it is absent
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_IntermixedParser)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, parents=[common])
        c.set_defaults(func=func)
        return c

    r = command("run", cmd_run, "answer one prompt, or chat interactively")
    r.add_argument("model")
    r.add_argument("prompt", nargs="?", help="prompt text ('-' reads stdin); omit for an interactive chat")
    r.add_argument("--raw", action="store_true", help="send the prompt without the chat template")
    r.add_argument("--threads", type=int, help="inference threads (default: physical cores)")
    r.add_argument("--verbose", "-v", action="store_true", help="print timings")
    _add_request_flags(r)

    pl = command("pull", cmd_pull, "prepare an embedded model (smollm2-135m)")
    pl.add_argument("model")
    pl.add_argument("--target", choices=TARGETS, help="ISA to quantize for (default: this host)")
    pl.add_argument("--scheme", help=SCHEME_HELP)

    c = command("convert", cmd_convert, "convert a Hugging Face folder or a .gguf file")
    c.add_argument("source")
    c.add_argument("--name", required=True)
    c.add_argument("--target", choices=TARGETS, help="ISA to quantize for (default: this host)")
    c.add_argument("--scheme", help=SCHEME_HELP)

    ls = command("list", cmd_list, "list installed models")
    ls.add_argument("--json", action="store_true")

    sh = command("show", cmd_show, "show a model's manifest, generation defaults and quality gate")
    sh.add_argument("model")
    sh.add_argument("--json", action="store_true")
    sh.add_argument("--verify", action="store_true", help="re-hash every file")

    rm = command("rm", cmd_rm, "delete a model")
    rm.add_argument("model")

    sv = command("serve", cmd_serve, "run the daemon (Unix socket + MQTT)")
    sv.add_argument("--config", help="YAML config file (default: $EDGED_CONFIG, else built-in defaults)")

    a = command("ask", cmd_ask, "send one prompt to a running daemon")
    a.add_argument("prompt", help="prompt text ('-' reads stdin)")
    a.add_argument("--socket", help="daemon socket (default: $EDGED_SOCKET or the default path)")
    a.add_argument("--mqtt", metavar="HOST[:PORT]", help="ask over MQTT 5 instead of the socket")
    a.add_argument("--node", help="the daemon's MQTT node name (with --mqtt)")
    a.add_argument("--prefix", default="edged", help="MQTT topic prefix (default: edged)")
    a.add_argument("--no-stream", action="store_true", help="one final frame instead of deltas")
    a.add_argument("--json", action="store_true", help="print the protocol frames")
    a.add_argument("--timeout", type=float, default=600, help="seconds to wait for the answer")
    _add_request_flags(a)

    st = command("status", cmd_status, "status of a running daemon")
    st.add_argument("--socket", help="daemon socket (default: $EDGED_SOCKET or the default path)")
    st.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except EdgedError as e:
        if args.debug:
            raise
        print(f"edged: error: {e.message}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"edged: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
