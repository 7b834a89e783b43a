"""The engine: one loaded model and the per-request decoding state.

    engine = Engine(model, EngineConfig())       # model: an installed model folder
    gen = engine.generate(GenerateRequest(prompt="hi"), cancel=threading.Event())
    for delta in gen: ...          # UTF-8-safe text deltas
    gen.stats                      # Ollama's final stats (names and units)

Names are resolved by the callers (`edged.models.loading.load_engine`); the
engine only needs the folder and its manifest. `prepare` (template + tokenize +
context check) is separate from decoding so the scheduler can reject a request
before it runs, and so batch.BatchDecoder can drive several prepared sequences
through one runner.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Protocol

from tokenizers import Tokenizer

from edged.engine.constrain import Constraints, Grammar, GrammarFailed, request_schema
from edged.engine.detok import IncrementalDecoder
from edged.engine.lookup import Speculator
from edged.engine.request import GenerateRequest, Options
from edged.engine.runner import EngineConfig, GraphInfo, Runner, release_free_memory
from edged.engine.sampling import Sampler
from edged.engine.stops import StopMatcher
from edged.engine.template import ChatTemplate, ControlText, tool_prompt_messages
from edged.errors import ContextOverflow, RequestError

log = logging.getLogger("edged.engine")


class Model(Protocol):
    """What the engine needs of an installed model (edged.models.store.Model is one)."""

    name: str
    path: Path
    manifest: dict

    def file(self, role: str) -> Path: ...

    @property
    def size_bytes(self) -> int: ...


# KV slots reserved beyond the prompt at first; the cache grows by doubling.
INITIAL_ROOM = 256


@dataclass(frozen=True)
class Prepared:
    tokens: list[int]
    options: Options
    capacity: int  # KV slots this request may need at most
    max_new: int
    truncated: int  # prompt tokens dropped to fit
    grammar: Grammar | None = None  # the answer must follow it (format, forced tool call)


class Engine:
    def __init__(self, model: Model, config: EngineConfig | None = None, *, load_ns: int = 0):
        config = config or EngineConfig()
        t0 = time.perf_counter_ns()
        m = model.manifest
        self.model = model
        self.config = config
        self.info = GraphInfo.from_manifest(m["graph"])
        self.tokenizer = Tokenizer.from_file(str(model.file("tokenizer")))
        self.control = ControlText(self.tokenizer)
        release_free_memory()  # before the weights arrive: the parse garbage must not add to the peak
        tmpl_path = m["files_by_role"].get("chat_template")
        self.template = (
            ChatTemplate(
                (model.path / tmpl_path).read_text(),
                bos_token=m.get("bos_token") or "",
                eos_token=m.get("eos_token") or "",
            )
            if tmpl_path
            else None
        )
        self.eos_ids = frozenset(m["eos_token_ids"])
        self.context_length = int(m["context_length"])
        self.defaults = Options.from_dict(m.get("generation_defaults") or {})
        self.runner = Runner(str(model.file("model")), self.info, config)
        # New requests decoding alone use prompt-lookup speculative decoding (engine/lookup.py);
        # graphs from converters before num_logits cannot, and decode plainly.
        self.speculative = config.lookup and self.runner.multi_logits
        release_free_memory()
        self.load_duration = load_ns + (time.perf_counter_ns() - t0)
        self._unreported_load = self.load_duration
        self.lock = threading.Lock()  # one generation at a time per engine

    # -- preparation -----------------------------------------------------------
    def render(self, req: GenerateRequest) -> str:
        """The prompt text as the model reads it: the rendered template, or a raw prompt."""
        text, marks = self._render(req)
        return self.control.reveal(text, marks)

    def prompt_tokens(self, req: GenerateRequest) -> list[int]:
        """The prompt's token ids. Control tokens come only from the chat template's own
        text: control-token text in the caller's strings is tokenized as plain text
        (template.ControlText). A raw prompt is the caller's own template, so control-token
        text in it is read as control tokens, as Ollama does."""
        text, marks = self._render(req)
        return self.control.encode(text, marks)

    def _render(self, req: GenerateRequest) -> tuple[str, dict[str, str]]:
        """The rendered prompt with markers in place of the caller's control-token text, and the markers."""
        if req.raw:
            return req.prompt or "", {}
        messages = list(req.messages) if req.messages is not None else [{"role": "user", "content": req.prompt}]
        if req.system is not None:
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": req.system})
        marks = self.control.markers(messages, req.tools)
        messages, tools = self.control.hide(messages, marks), self.control.hide(req.tools, marks)
        if self.template is None:
            return "\n".join(m["content"] for m in tool_prompt_messages(messages, tools)), marks
        return self.template.render(messages, add_generation_prompt=True, tools=tools), marks

    def prepare(self, req: GenerateRequest, *, max_predict: int | None = None) -> Prepared:
        opts = Options.from_dict(req.options, base=self.defaults)
        if max_predict is not None and not 0 < opts.num_predict <= max_predict:
            opts = replace(opts, num_predict=max_predict)  # the daemon's cap; -1 (to the context's end) too
        tokens = self.prompt_tokens(req)
        if not tokens:
            raise RequestError("prompt is empty", field="prompt")
        n_ctx = min(opts.num_ctx or self.context_length, self.context_length)
        truncated = 0
        if len(tokens) >= n_ctx:
            if not opts.truncate:
                raise ContextOverflow(
                    f"prompt is {len(tokens)} tokens; the context holds {n_ctx} "
                    f"(set options.truncate=true to drop the oldest tokens, or raise options.num_ctx)",
                    prompt_tokens=len(tokens),
                    num_ctx=n_ctx,
                )
            keep = n_ctx - (opts.num_predict if 0 < opts.num_predict < n_ctx // 2 else n_ctx // 4)
            truncated = len(tokens) - keep
            tokens = tokens[-keep:]
        room = n_ctx - len(tokens)
        max_new = room if opts.num_predict < 0 else min(opts.num_predict, room)
        constraint = request_schema(req)
        grammar = Constraints.of(self).grammar(constraint[0], field=constraint[1]) if constraint else None
        return Prepared(tokens, opts, len(tokens) + max_new, max_new, truncated, grammar)

    # -- generation ------------------------------------------------------------
    def generate(self, req: GenerateRequest, *, cancel: threading.Event | None = None) -> "Generation":
        return Generation(self, self.prepare(req), cancel)

    def describe(self) -> dict:
        m = self.model.manifest
        return {
            "name": self.model.name,
            "quantization": m["quantization"]["scheme"],
            "target": m["target"],
            "context_length": self.context_length,
            "threads": self.config.effective_threads,
            "size": self.model.size_bytes,
        }


class Decoder:
    """Per-request decoding state: sampling, EOS, stop strings, detokenization,
    limits, deadline and cancellation. Shared by Generation (one request) and
    batch.BatchDecoder (several requests advancing together)."""

    def __init__(
        self, engine: "Engine", prepared: Prepared, cancel: threading.Event | None, *, deadline: float | None = None
    ):
        self.eos = engine.eos_ids
        self.p = prepared
        self.cancel = cancel or threading.Event()
        self.deadline = deadline  # time.monotonic() after which no further token is made
        self.sampler = Sampler(prepared.options)
        self.detok = IncrementalDecoder(engine.tokenizer)
        # With a grammar, stop strings are not applied: it decides where the answer ends.
        self.guide = prepared.grammar.start() if prepared.grammar is not None else None
        self.stops = StopMatcher(() if self.guide else prepared.options.stop)
        self.history = list(prepared.tokens)
        self.tokens: list[int] = []
        self.n = 0
        self.cached = 0  # leading prompt tokens whose KV came from the prefix cache (not evaluated)
        self.reason: str | None = None
        self._stop_string = False
        # Speculative decoding (engine/lookup.py): drafts from the history, verified by advance().
        self.lookup = Speculator(self.history) if getattr(engine, "speculative", False) else None
        self.drafted = 0  # draft tokens verified
        self.accepted = 0  # of them, tokens the sampler chose too
        self._round = 0  # self.accepted when the last draft was made

    def draft(self) -> list[int]:
        """Tokens to verify in the next step after the token advance() returned ([]: a
        plain step). The caller runs that token and the draft in one pass and calls
        advance() on the rows in order, passing each row's draft token as `expect`,
        until the token advance() returns is not the expected one."""
        if self.lookup is None:
            return []
        self.lookup.outcome(self.accepted - self._round)
        # the pass also returns the token after the draft: room for one more
        draft = self.lookup.draft(self.p.max_new - self.n - 1)
        self.drafted += len(draft)
        self._round = self.accepted
        return draft

    def advance(self, logits, expect: int | None = None) -> tuple[str, int | None]:
        """Consume next-token logits: return (text to emit, token to feed next or None when done).

        `expect`: the draft token at this position, when these logits come from a verify
        pass. The token is chosen exactly as without a draft (same processing of the
        logits, same draw from the request's generator) and the draft token counts as
        accepted when it is that token; see engine/lookup.py for why this keeps the
        sampling distribution."""
        if self.cancel.is_set():
            return self._finish("cancel"), None
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return self._finish("deadline"), None
        try:
            if self.guide is not None:
                logits = self.guide.mask(logits)
            tok = self.sampler(logits, self.history)
            if self.guide is not None and tok not in self.eos:
                self.guide.advance(tok)
        except GrammarFailed as e:
            log.warning("constrained decoding stopped: %s", e)
            return self._finish("error"), None
        self.n += 1
        if expect is not None and tok == expect:
            self.accepted += 1
        if tok in self.eos:
            return self._finish("stop"), None
        self.history.append(tok)
        self.tokens.append(tok)
        out, hit = self.stops.feed(self.detok.push(tok))
        if hit:
            self._stop_string = True
            return out + self._finish("stop"), None
        if self.guide is not None and self.guide.complete:
            return out + self._finish("stop"), None  # the grammar admits nothing more: EOS
        if self.n >= self.p.max_new:
            return out + self._finish("length"), None
        return out, tok

    def _finish(self, reason: str) -> str:
        self.reason = reason
        if self._stop_string:
            return ""  # held-back text belonged to the stop string
        tail, _ = self.stops.feed(self.detok.flush())
        return tail + self.stops.flush()

    def stats(self, *, prompt_ns: int, eval_ns: int, load_ns: int, total_ns: int) -> dict:
        s = {
            "done_reason": self.reason,
            "prompt_eval_count": len(self.p.tokens) - self.cached,  # as Ollama: the tokens evaluated
            "prompt_cache_tokens": self.cached,
            "prompt_eval_duration": prompt_ns,
            "eval_count": self.n,
            "eval_duration": eval_ns,
            "load_duration": load_ns,
            "total_duration": total_ns,
            "draft_tokens": self.drafted,  # speculative decoding (not in Ollama's API)
            "accepted_tokens": self.accepted,
        }
        if self.p.truncated:
            s["truncated_tokens"] = self.p.truncated
        return s


class Generation:
    """Iterate for text deltas; afterwards `stats`, `text` and `done_reason` are set."""

    def __init__(self, engine: Engine, prepared: Prepared, cancel: threading.Event | None):
        self.engine = engine
        self.prepared = prepared
        self.cancel = cancel or threading.Event()
        self.done_reason: str | None = None
        self.text = ""
        self.tokens: list[int] = []
        self.stats: dict = {}

    def __iter__(self) -> Iterator[str]:
        eng, p = self.engine, self.prepared
        t_start = time.perf_counter_ns()
        with eng.lock:
            load_ns, eng._unreported_load = eng._unreported_load, 0
            dec = Decoder(eng, p, self.cancel)
            self.tokens = dec.tokens
            seq = eng.runner.sequence(min(p.capacity, len(p.tokens) + INITIAL_ROOM), p.capacity)
            t0 = time.perf_counter_ns()
            logits = seq.forward(p.tokens)
            t1 = time.perf_counter_ns()
            delta, tok = dec.advance(logits)
            while True:
                if delta:
                    self.text += delta
                    yield delta
                if tok is None:
                    break
                draft = dec.draft()
                if not draft:
                    delta, tok = dec.advance(seq.forward([tok]))
                    continue
                # speculative step: the token and its draft in one pass, a row per position
                rows = seq.verify([tok, *draft])
                for i, d in enumerate(draft):
                    delta, tok = dec.advance(rows[i], d)
                    if tok != d:  # rejected here (or done): the later positions are dropped
                        seq.truncate(seq.length - (len(draft) - i))
                        break
                    if delta:
                        self.text += delta
                        yield delta
                else:
                    delta, tok = dec.advance(rows[-1])
            t2 = time.perf_counter_ns()
        self.done_reason = dec.reason
        self.stats = dec.stats(
            prompt_ns=t1 - t0, eval_ns=t2 - t1, load_ns=load_ns, total_ns=time.perf_counter_ns() - t_start + load_ns
        )

    def run(self) -> str:
        for _ in self:
            pass
        return self.text
