"""onnxruntime session and per-sequence KV state for edged's decoder graphs.

The graph contract is written down in models/builder.py. Each sequence owns one
preallocated key and value buffer per layer, sized for this request (prompt +
tokens to predict, not the whole context). The same buffer is bound as past
input and present output, so GroupQueryAttention appends in place and a decode
step allocates nothing but two tiny input arrays.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edged.engine.embedding import FILENAME as EMBEDDING_FILE
from edged.engine.embedding import EmbeddingTable

_OPT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def physical_cores() -> int:
    """Physical cores we may run on (SMT siblings count once)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """onnxruntime settings. Every field is documented in docs/engine.md."""

    threads: int | None = None  # intra-op threads; None = physical cores
    spinning: bool = False  # onnxruntime's own, unbounded busy-waiting: off (it burns cores between requests)
    # With spinning off, pool threads still busy-wait this long for the next op of the same
    # run before they sleep (0: sleep at once). Measured on SmolLM2, 2 threads: 200 us gives
    # +20-25 % decode tok/s at the same CPU time per token and no CPU use while idle.
    spin_duration_us: int = 200
    graph_optimization: str = "all"  # disabled | basic | extended | all
    memory_arena: bool = True  # onnxruntime's CPU arena: fewer mallocs, more resident memory
    # Prompts run through the graph this many tokens at a time. Why: a prefill's
    # activations and attention scratch grow with the tokens in one run, and the arena
    # keeps its high-water mark; 64-token chunks cut the peak of a 400-token prompt by
    # ~19 MiB for ~5 % more prefill time (SmolLM2, 2 threads; docs/engine.md).
    prefill_chunk: int = 64
    verify: str = "fast"  # fast (size+mtime cache, then sha256 on change) | full | none
    # Prompt-lookup speculative decoding (engine/lookup.py) for a request decoding alone;
    # needs a graph with the num_logits input (converter version 4 or later).
    lookup: bool = True

    def __post_init__(self):
        if self.graph_optimization not in _OPT_LEVELS:
            raise ValueError(f"graph_optimization must be one of {', '.join(_OPT_LEVELS)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        if self.spin_duration_us < 0:
            raise ValueError("spin_duration_us must be >= 0")
        if self.verify not in ("fast", "full", "none"):
            raise ValueError("verify must be fast, full or none")

    @property
    def effective_threads(self) -> int:
        return self.threads or physical_cores()

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.effective_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = _OPT_LEVELS[self.graph_optimization]
        so.enable_cpu_mem_arena = self.memory_arena
        so.log_severity_level = 3
        bounded = not self.spinning and self.spin_duration_us > 0
        spin = "1" if self.spinning or bounded else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")  # one inter-op thread: nothing to wait for
        if bounded:
            so.add_session_config_entry("session.intra_op.spin_duration_us", str(self.spin_duration_us))
        return so


@dataclass(frozen=True, kw_only=True)
class GraphInfo:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_manifest(cls, graph: dict) -> "GraphInfo":
        return cls(
            num_layers=graph["num_layers"],
            num_kv_heads=graph["num_kv_heads"],
            head_dim=graph["head_dim"],
            vocab_size=graph["vocab_size"],
        )

    def kv_bytes(self, tokens: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4 * tokens


def release_free_memory() -> None:
    """Hand memory freed by the C heap back to the kernel (glibc only).

    Why: loading a tokenizer parses a 3.5 MB JSON into ~40 MB of short-lived
    allocations, and onnxruntime's session set-up leaves freed buffers too; glibc
    keeps them in its arenas, where they count as resident memory for the rest of
    the daemon's life. malloc_trim(0) returns them (measured: -31 MB after the
    SmolLM2 tokenizer)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def lazy_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A zero-filled array on its own anonymous mapping: only pages written become resident.

    Why not np.zeros: glibc serves big callocs from fresh mappings (lazily zero) only
    above its mmap threshold, and it raises that threshold after big frees. A KV cache
    allocated after an earlier one was freed then came from the heap, zeroed in full
    and resident in full (+29 MiB for an idle 4-slot batch cache in the daemon)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


MADV_DONTNEED = 4  # the same number on every Linux architecture


def _release_clean_mappings(select) -> int:
    """MADV_DONTNEED every file mapping for which select(perms, path) is true and that
    has no modified page (smaps "Anonymous: 0 kB"): only clean file pages are dropped,
    and a page touched again is read back from the page cache or the file. Returns the
    bytes of mappings released."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        with open("/proc/self/smaps") as f:
            smaps = f.read().splitlines()
        with open("/proc/self/maps") as f:
            # An emulator (qemu-user) may show its host's smaps but the guest's maps:
            # release only ranges both agree on.
            mapped = {line.split(maxsplit=1)[0] for line in f}
    except (OSError, AttributeError):  # not Linux/glibc: nothing to do
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    candidates, current = [], None
    for line in smaps:
        parts = line.split(maxsplit=5)
        if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:  # a mapping's header line
            current = None
            if len(parts) == 6 and parts[0] in mapped and select(parts[1], parts[5]):
                current = tuple(int(x, 16) for x in parts[0].split("-"))
        elif current and parts[:1] == ["Anonymous:"] and parts[1] == "0":
            candidates.append(current)
    released = 0
    for start, end in candidates:
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            released += end - start
    return released


def release_mapped_weights(model_path: str) -> int:
    """Drop the resident pages of onnxruntime's mappings of the model's files.

    Why: onnxruntime maps external weights, prepacks the MatMulNBits weights into
    its own buffers and unmaps those, but keeps the mapping of inputs its kernels
    do not report as packed (the block scales, ~16 MB for SmolLM2). The prepacked
    copy is what runs; the pages read while prepacking stay resident for nothing.
    The mappings are private and writable, so only those with no modified page
    are released. Returns the bytes of mappings released."""
    folder = os.path.dirname(os.path.realpath(model_path)) + os.sep
    return _release_clean_mappings(lambda perms, path: path.startswith(folder))


def release_unused_code() -> int:
    """Drop the resident pages of read-only file mappings: library code and constants.

    Why: importing onnxruntime and creating a session run code that decoding never
    runs again (static initializers, graph transformers, prepacking); its pages stay
    mapped and count in this process's RSS (onnxruntime's library alone: 21 MiB
    resident after a SmolLM2 load, ~10 MiB of it used by requests). Called before the
    weights arrive and after the session is made, it cut the peak RSS of a load + the
    benchmark's two requests from 280 to 259 MiB. It changes what this process maps,
    not what the machine holds: the pages stay in the page cache (the kernel may
    reclaim them, as it could reclaim unused mapped code), and code that runs again
    maps its pages back with a minor fault. Only private mappings without write
    permission are released (text, read-only data; never a page the process wrote)."""
    return _release_clean_mappings(lambda perms, path: perms.endswith("p") and "w" not in perms and path.startswith("/"))


def open_session(model_path: str, config: EngineConfig) -> ort.InferenceSession:
    release_unused_code()  # import and tokenizer code, before the weights' peak
    session = ort.InferenceSession(model_path, config.session_options(), providers=["CPUExecutionProvider"])
    release_mapped_weights(model_path)
    release_unused_code()  # session set-up code
    return session


class Runner:
    """One onnxruntime session; hands out Sequences that share it.

    Graphs built for the engine take `inputs_embeds` and read the token embedding
    from the table next to the model file (engine/embedding.py); the fp32 graphs
    used as the quality-gate reference take `input_ids`. Both are run the same way."""

    def __init__(self, model_path: str, info: GraphInfo, config: EngineConfig,
                 *, session: ort.InferenceSession | None = None, embedding: EmbeddingTable | None = None):
        self.info = info
        self.config = config
        self.session = session or open_session(model_path, config)
        self.embedding = embedding
        if embedding is None and "inputs_embeds" in {i.name for i in self.session.get_inputs()}:
            self.embedding = EmbeddingTable(os.path.join(os.path.dirname(os.path.abspath(model_path)), EMBEDDING_FILE))
        # Whether a run can return the logits of its last n positions (builder's num_logits,
        # an overridable initializer, so it is not among get_inputs()). Older graphs return
        # the last position only: no speculative decoding for them.
        self.multi_logits = "num_logits" in {i.name for i in self.session.get_overridable_initializers()}

    def bind_tokens(self, io: ort.IOBinding, ids: np.ndarray) -> None:
        """Bind token ids [batch, seq] as the graph's first input."""
        if self.embedding is not None:
            io.bind_cpu_input("inputs_embeds", self.embedding.rows(ids))
        else:
            io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))

    def refresh(self) -> None:
        """Called while no sequence is live: a runner that changes its session does it here."""

    def sequence(self, capacity: int, max_capacity: int | None = None) -> "Sequence":
        self.refresh()
        return Sequence(self, capacity, max_capacity)


class LogitRows:
    """A logits buffer for runs that return the last n positions, n <= rows, and the
    bindings that select n: `num_logits` and the output bound to the first n rows.
    The OrtValues are made once and kept here (the bindings only refer to them)."""

    def __init__(self, vocab: int, rows: int):
        self.buf = np.zeros((1, rows, vocab), np.float32)
        self._counts = [ort.OrtValue.ortvalue_from_numpy(np.array([n], np.int64)) for n in range(rows + 1)]
        self._views = [None] + [ort.OrtValue.ortvalue_from_numpy(self.buf[:, :n]) for n in range(1, rows + 1)]

    @property
    def rows(self) -> int:
        return self.buf.shape[1]

    def bind(self, io: ort.IOBinding, n: int) -> np.ndarray:
        """Make the next run of `io` write its last n positions' logits here; returns them [n, vocab]."""
        io.bind_ortvalue_input("num_logits", self._counts[n])
        io.bind_ortvalue_output("logits", self._views[n])
        return self.buf[0, :n]

    def unbind(self, io: ort.IOBinding, logits: ort.OrtValue) -> None:
        """Back to one position, written to `logits` (the binding's usual buffer)."""
        io.bind_ortvalue_input("num_logits", self._counts[1])
        io.bind_ortvalue_output("logits", logits)


class Sequence:
    """KV cache and bindings for one sequence.

    The cache starts at `capacity` slots and doubles on demand up to
    `max_capacity`: onnxruntime's attention allocates scratch in proportion to
    the bound cache length (measured: +240 MB for an 8192-slot SmolLM2 cache at
    prefill), so reserving the whole context for every request would cost that
    much memory even for a one-line answer.
    """

    def __init__(self, runner: Runner, capacity: int, max_capacity: int | None = None):
        self.runner = runner
        self.max_capacity = max(capacity, max_capacity or capacity)
        self.length = 0
        self.io = runner.session.io_binding()
        self.logits = np.zeros((1, 1, runner.info.vocab_size), np.float32)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.io.bind_ortvalue_output("logits", self._logits_value)
        self._rows: LogitRows | None = None  # for verify(), made on first use
        self._kv: list[np.ndarray] = []
        self._ones = np.ones((1, self.max_capacity), np.int64)  # attention masks are views of it
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        info = self.runner.info
        old = self._kv
        # numpy owns the memory, OrtValues view it; past and present are the same buffer.
        self._kv = [lazy_zeros((1, info.num_kv_heads, capacity, info.head_dim)) for _ in range(2 * info.num_layers)]
        for new, prev in zip(self._kv, old):
            new[:, :, : self.length] = prev[:, :, : self.length]
        for i in range(info.num_layers):
            for j, kind in enumerate(("key", "value")):
                buf = ort.OrtValue.ortvalue_from_numpy(self._kv[2 * i + j])
                self.io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                self.io.bind_ortvalue_output(f"present.{i}.{kind}", buf)
        self.capacity = capacity

    def _room(self, total: int) -> None:
        if total > self.capacity:
            if total > self.max_capacity:
                raise ValueError(f"sequence capacity {self.max_capacity} exceeded ({total})")
            self._allocate(min(max(total, 2 * self.capacity), self.max_capacity))

    def forward(self, tokens: list[int]) -> np.ndarray:
        """Feed tokens (a prompt or one new token); return next-token logits [vocab].
        A long prompt runs in chunks of config.prefill_chunk tokens."""
        self._room(self.length + len(tokens))
        chunk = self.runner.config.prefill_chunk
        for start in range(0, len(tokens), chunk):
            part = tokens[start : start + chunk]
            end = self.length + len(part)
            self.runner.bind_tokens(self.io, np.asarray([part], dtype=np.int64))
            self.io.bind_cpu_input("attention_mask", self._ones[:, :end])
            self.runner.session.run_with_iobinding(self.io)
            self.length = end
        return self.logits[0, -1]

    def verify(self, tokens: list[int]) -> np.ndarray:
        """Feed a few tokens in one run (a token and a draft after it) and return the
        next-token logits after each of them, [len(tokens), vocab] (a view, valid until
        the next call). Needs runner.multi_logits. The caller keeps what it accepts and
        hands the rest back with truncate()."""
        n = len(tokens)
        self._room(self.length + n)
        if self._rows is None or self._rows.rows < n:
            self._rows = LogitRows(self.runner.info.vocab_size, max(n, 8))
        out = self._rows.bind(self.io, n)
        self.runner.bind_tokens(self.io, np.asarray([tokens], dtype=np.int64))
        self.io.bind_cpu_input("attention_mask", self._ones[:, : self.length + n])
        try:
            self.runner.session.run_with_iobinding(self.io)
        finally:
            self._rows.unbind(self.io, self._logits_value)
        self.length += n
        return out

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (rejected draft tokens): the next run
        writes over them, and the attention mask no longer covers them."""
        self.length = min(self.length, length)
