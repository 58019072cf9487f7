"""Continuous batching on a thread of its own: the scheduler and model step of the compiled decoder.

Each step the runner builds one flat batch: one token for every sequence that is decoding, then prefill chunks
(new prompts, or the rest of long ones) up to `max_batch_tokens`, runs the compiled decoder over it, samples the
rows that end a sequence's known tokens, and hands the new tokens to the event loop in one call. Prompts start
from the longest prefix already in the paged cache (blocks.py). When the cache runs out of pages, the sequence
admitted last is preempted: its pages are released and it is recomputed later from its prompt and what it had
generated, so nothing it streamed changes.

The model step runs here and only here, so gRPC, detokenization and grammar compilation on the event loop never
wait for it and it never waits for them, except for the GIL between torch's calls. The thread that runs it
also loaded and compiled the model (see `serve`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service.engines.compiled.attention import (LONG_DECODE_KEYS, BatchPlan, DecodeGroup, KVCache, SequenceSpan,
                                                batch_context)
from service.engines.compiled.blocks import BlockManager, OutOfBlocks
from service.engines.sampling import RequestSampler, SamplingPlan

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Sequence:
    """One choice being generated. `generated` is appended on the runner thread and read on the event loop."""

    rid: str
    tokens: list[int]  # the prompt, then every generated token
    max_new_tokens: int
    end_ids: frozenset[int]
    plan: SamplingPlan
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    cached_tokens: int | None = None
    # Runner thread only:
    pages: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    published: int = 0  # full pages recorded in the prefix cache
    chain: int = 0  # the chain hash after the published pages
    cancelled: bool = False


class Runner:
    def __init__(self, forward: Callable, logits: Callable, cache: KVCache, blocks: BlockManager, scale: float,
                 max_batch_tokens: int, max_running: int, context_length: int, scratch_slot: int,
                 forward_small: Callable | None = None, small_rows: int = 0) -> None:
        """`forward_small`, when given, runs batches of at most `small_rows` rows (the int8 weights)."""
        self._forward = forward
        self._forward_small = forward_small
        self._small_rows = small_rows
        self._logits = logits
        self._cache = cache
        self._blocks = blocks
        self._scale = scale
        self._max_batch_tokens = max_batch_tokens
        self._max_running = max_running
        self._context_length = context_length
        self._scratch_slot = scratch_slot
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.fatal: str | None = None
        self.fault: str | None = None
        self.preemptions = 0

    # ------------------------------------------------------------------------------ event loop thread

    def attach(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        """Outputs go to `loop`; `thread` is the one that runs `serve`."""
        self._loop = loop
        self._thread = thread

    def stop(self, timeout: float = 30) -> None:
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self.fatal is None and self._thread is not None and self._thread.is_alive()

    def submit(self, seq: Sequence) -> None:
        self._inbox.put(("add", seq))

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._inbox.put(("cancel", seq))

    def counts(self) -> tuple[int, int]:
        return len(self._running), len(self._waiting)

    def held(self) -> int:
        """Sequences the runner still holds (running, waiting, or not yet taken in)."""
        return len(self._running) + len(self._waiting) + self._inbox.qsize()

    # ------------------------------------------------------------------------------ runner thread

    def serve(self) -> None:
        """The scheduling loop, until `stop`. Runs on the thread that loaded and compiled the model: with OpenMP,
        torch's parallel kernels ran 2-3x slower on a second thread than on the one that first used them
        (measured: a 3x3x64 by 64x120 bf16 matmul 37 us on the first thread, 148 us on another)."""
        # Inference mode is thread-local, and the compiled graph was traced under it: the step must run in it too.
        with torch.inference_mode():
            try:
                while not self._stopping:
                    self._take_inbox(block=not (self._running or self._waiting))
                    if self._stopping:
                        break
                    if self._running or self._waiting:
                        self._step()
            except Exception as e:  # the engine is dead: every open sequence fails, the service stops serving
                log.exception("the model runner failed")
                self.fatal = f"{type(e).__name__}: {e}"
                for seq in [*self._running, *self._waiting]:
                    seq.error = "the engine failed while generating this request"
                self._deliver([*self._running, *self._waiting])

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                kind, seq = item
                if kind == "add" and not seq.cancelled:
                    self._waiting.append(seq)
                elif kind == "cancel":
                    self._drop(seq)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drop(self, seq: Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self._release(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)

    def _release(self, seq: Sequence) -> None:
        self._blocks.release(seq.pages)
        seq.pages = []

    def _ensure_pages(self, seq: Sequence, tokens: int) -> bool:
        size = self._blocks.block_size
        while len(seq.pages) * size < tokens:
            try:
                seq.pages.append(self._blocks.allocate())
            except OutOfBlocks:
                return False
        return True

    def _preempt_for(self, seq: Sequence) -> bool:
        """Free pages for `seq` by preempting the sequence admitted last (never `seq` itself)."""
        for victim in reversed(self._running):
            if victim is not seq:
                self._running.remove(victim)
                self._release(victim)
                victim.computed = victim.published = victim.chain = 0
                self._waiting.appendleft(victim)
                self.preemptions += 1
                log.info("preempted %s: the KV cache is full", victim.rid)
                return True
        return False

    def _schedule(self) -> list[tuple[Sequence, int, int]]:
        """This step's work: (sequence, first position, token count) for each sequence in the batch."""
        work: list[tuple[Sequence, int, int]] = []
        budget = self._max_batch_tokens
        for seq in list(self._running):
            if seq not in self._running or seq.computed < len(seq.tokens) - 1:
                continue  # preempted meanwhile, or still prefilling
            while not self._ensure_pages(seq, seq.computed + 1):
                if not self._preempt_for(seq):
                    break
            if len(seq.pages) * self._blocks.block_size <= seq.computed:
                # Alone and still out of room: the cache cannot hold this sequence any longer.
                self._finish(seq)
                continue
            work.append((seq, seq.computed, 1))
            budget -= 1
        # A sequence scheduled above may have been preempted for a later one: it no longer holds its pages.
        work = [w for w in work if w[0] in self._running]
        budget = self._max_batch_tokens - len(work)
        prefilling = [s for s in self._running if s.computed < len(s.tokens) - 1]
        for seq in prefilling:
            if budget <= 0:
                return work
            count = min(len(seq.tokens) - seq.computed, budget)
            if not self._ensure_pages(seq, seq.computed + count):
                continue
            work.append((seq, seq.computed, count))
            budget -= count
        while budget > 0 and self._waiting and len(self._running) < self._max_running:
            seq = self._waiting[0]
            if not seq.pages:
                seq.pages, seq.chain = self._blocks.match_prefix(seq.tokens)
                seq.computed = len(seq.pages) * self._blocks.block_size
                seq.published = len(seq.pages)
                if seq.cached_tokens is None:
                    seq.cached_tokens = seq.computed
                    seq.plan.cached_tokens = seq.computed
            count = min(len(seq.tokens) - seq.computed, budget)
            if not self._ensure_pages(seq, seq.computed + count):
                if not self._running and not work:
                    # Nothing else holds pages: this prompt alone is more than the cache holds.
                    self._waiting.popleft()
                    self._release(seq)
                    seq.error = "the prompt does not fit in the KV cache (raise --kv-cache-tokens)"
                    self._deliver([seq])
                    continue
                return work
            self._waiting.popleft()
            self._running.append(seq)
            work.append((seq, seq.computed, count))
            budget -= count
        return work

    def _step(self) -> None:
        if self.fault is not None:
            raise RuntimeError(self.fault)
        work = self._schedule()
        if not work:
            return
        size = self._blocks.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        plan = BatchPlan(slots=torch.empty(0, dtype=torch.long))
        decodes: list[tuple[int, Sequence]] = []
        sample_rows: list[int] = []
        for seq, start, count in work:
            row = len(tokens)
            tokens.extend(seq.tokens[start : start + count])
            positions.extend(range(start, start + count))
            pages = seq.pages
            slots.extend(pages[p // size] * size + p % size for p in range(start, start + count))
            keys = start + count
            if count == 1:
                decodes.append((row, seq))
            else:
                plan.prefills.append(_span(row, row + count, pages, keys, size))
            if start + count == len(seq.tokens):
                sample_rows.append(row + count - 1)
        short = [(row, seq) for row, seq in decodes if seq.computed + 1 <= LONG_DECODE_KEYS]
        if len(short) < 2:
            short = []
        grouped = {id(seq) for _, seq in short}
        for row, seq in decodes:
            if id(seq) not in grouped:
                plan.singles.append(_span(row, row + 1, seq.pages, seq.computed + 1, size))
        if short:
            plan.decode = _decode_group(short, size)
        if len(tokens) == 1:
            # One row is padded to two, so every batch runs the one dynamic graph (a one-row batch would be compiled
            # as a graph of its own: a second compile at every start). The pad row writes its key to a slot no
            # sequence owns and attends to nothing; rows never mix outside attention, so its output is ignored.
            tokens.append(0)
            positions.append(0)
            slots.append(self._scratch_slot)
        plan.slots = torch.tensor(slots, dtype=torch.long)
        with batch_context(self._cache, plan, self._scale):
            forward = self._forward_small if self._forward_small and len(tokens) <= self._small_rows else self._forward
            hidden = forward(torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long))
        logits = self._logits(hidden[sample_rows]) if sample_rows else None

        greedy = logits.argmax(dim=-1).tolist() if logits is not None else []
        done: list[Sequence] = []
        index = 0
        for seq, start, count in work:
            seq.computed = start + count
            self._publish(seq)
            if seq.computed < len(seq.tokens):
                continue  # a prefill chunk that is not the last
            row = index
            index += 1
            plan_ = seq.plan
            token = greedy[row] if plan_.plain else RequestSampler._pick(plan_, logits[row], seq.generated)
            seq.tokens.append(token)
            seq.generated.append(token)
            if (token in seq.end_ids or len(seq.generated) >= seq.max_new_tokens
                    or len(seq.tokens) >= self._context_length):
                self._finish(seq, deliver=False)
            done.append(seq)
        self._deliver(done)

    def _publish(self, seq: Sequence) -> None:
        size = self._blocks.block_size
        while (seq.published + 1) * size <= seq.computed:
            i = seq.published
            seq.chain = self._blocks.publish(seq.pages[i], seq.tokens[i * size : (i + 1) * size], seq.chain)
            seq.published += 1

    def _finish(self, seq: Sequence, deliver: bool = True) -> None:
        seq.finished = True
        if seq in self._running:
            self._running.remove(seq)
        self._release(seq)
        if deliver:
            self._deliver([seq])

    def _deliver(self, seqs: list[Sequence]) -> None:
        if seqs and self._loop is not None:
            self._loop.call_soon_threadsafe(_wake_all, seqs)


def _wake_all(seqs: list[Sequence]) -> None:
    for seq in seqs:
        seq.wake.set()


def _span(q_start: int, q_end: int, pages: list[int], keys: int, size: int) -> SequenceSpan:
    used = pages[: (keys + size - 1) // size]
    if used[-1] - used[0] == len(used) - 1:  # contiguous pages: the keys are one slice of the cache
        return SequenceSpan(q_start, q_end, used[0] * size, keys, None)
    return SequenceSpan(q_start, q_end, 0, keys, _slots(used, keys, size))


def _slots(pages: list[int], keys: int, size: int) -> torch.Tensor:
    return (torch.tensor(pages, dtype=torch.long).unsqueeze(1) * size + torch.arange(size)).flatten()[:keys]


def _decode_group(rows: list[tuple[int, Sequence]], size: int) -> DecodeGroup:
    lengths = [seq.computed + 1 for _, seq in rows]
    longest = max(lengths)
    index = torch.empty(len(rows), longest, dtype=torch.long)
    bias = torch.zeros(len(rows), 1, 1, longest)
    for i, (_, seq) in enumerate(rows):
        n = lengths[i]
        slots = _slots(seq.pages[: (n + size - 1) // size], n, size)
        index[i, :n] = slots
        index[i, n:] = slots[-1]
        bias[i, ..., n:] = float("-inf")
    return DecodeGroup(torch.tensor([row for row, _ in rows], dtype=torch.long), index, bias)
