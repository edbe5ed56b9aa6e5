"""A request inside the inference engine, as two separate states (vLLM's split):

- `SequenceState`: what the scheduler decides with, on the engine's driver only: the request, its KV block
  table, its tokens (prompt + generated) and how many of them are in the cache, its prefix-cache names, its
  LoRA slot.
- `DecodingState`: what the output processor turns tokens into outputs with: the sampling generator, the token
  counts its penalties need, its grammar's matcher (structured output), stop rules, incremental detokenizer,
  log-probabilities waiting to be handed out, timings, and where outputs go (`sink`).

And the plan between them: `Scheduler.schedule()` returns a `SchedulerOutput`: the requests admitted this step
and a list of `ScheduledForward`s, each one `ForwardBatch` (plain data: token ids, positions, block tables,
adapter slots; what an executor sends to its workers) with the sequences its rows belong to. The executor
answers each batch with a `ForwardResult`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from neoxray.model.decoding import IncrementalDetokenizer, StopChecker, TokenHistory
from neoxray.platform.inference.request import Output, Request, TokenLogprob
from neoxray.platform.inference.structured import SequenceGrammar


@dataclass
class DecodingState:
    """The output side of one request: set up on admission (`OutputProcessor.start`)."""

    sink: Callable[[Output], None]
    """Called on the engine thread with each Output."""
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    history: TokenHistory | None = None
    """Counts of its generated tokens and its prompt's tokens, on the logits' device: only where its sampling
    uses presence, frequency or repetition penalties (made at its first sampled token)."""
    grammar: SequenceGrammar | None = None
    """Where its text stands in its grammar (`Request.structured`), advanced with each token it samples."""
    stop: StopChecker | None = None
    detokenizer: IncrementalDetokenizer | None = None
    emitted_chars: int = 0  # text handed out so far
    text_chars: int = 0  # the generated text decoded so far: where the next token's text starts
    prompt_offsets: list[int] | None = None  # with token_text and prompt log-probabilities: each token's start
    prompt_lp: list[TokenLogprob] | None = None
    pending_lp: list[TokenLogprob] = field(default_factory=list)  # not yet in an Output
    first_token_at: float | None = None


@dataclass(eq=False)
class SequenceState:
    """The scheduling side of one request, from arrival to release (compared by identity)."""

    req: Request
    arrival: float
    decoding: DecodingState
    blocks: list[int] = field(default_factory=list)
    """Its KV cache blocks (the block table), reserved on admission."""
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    computed: int = 0  # tokens whose keys/values are in the cache
    finished: bool = False
    names: list[bytes] = field(default_factory=list)  # prefix-cache names of its full prompt blocks
    reused: int = 0  # prompt tokens taken from the prefix cache
    lora_slot: int | None = None  # its LoRA adapter's slot (None: the base model), set on intake
    lora_held: bool = False  # counted as a user of its adapter (`AdapterSlots.acquire`) until released
    prefix_salt: bytes = b""  # its adapter's prefix-cache salt: KV blocks are shared within one adapter only

    @classmethod
    def of(cls, req: Request, sink: Callable[[Output], None], arrival: float) -> SequenceState:
        return cls(req=req, arrival=arrival, decoding=DecodingState(sink=sink))

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def feed_len(self) -> int:
        """Prompt tokens that go through the model: all of them, but for a scoring-only request (max_tokens 0,
        prompt log-probabilities) the last one, which is only a target (as transformers' scoring does)."""
        n = self.prompt_len
        return n - 1 if (self.req.max_tokens == 0 and self.req.prompt_logprobs and n > 1) else n

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.feed_len


@dataclass
class ForwardBatch:
    """One forward of the model, as plain data (picklable, no requests): row i feeds `tokens[i]`, the tokens at
    positions starts[i] .. starts[i] + len(tokens[i]) - 1 of its sequence, against the KV blocks
    `block_tables[i]` with LoRA slot `lora_slots[i]` (None: the base)."""

    tokens: list[list[int]]
    starts: list[int]
    block_tables: list[list[int]]
    lora_slots: list[int | None]
    sample: list[int] = field(default_factory=list)
    """Rows whose last token's next-token logits are wanted (a prompt completed, or a decode step)."""
    score: list[tuple[int, int]] = field(default_factory=list)
    """(row, first): log-probabilities of the next token after the row's tokens first .. end are wanted."""

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]


@dataclass
class ForwardResult:
    """What an executor returns for a ForwardBatch: fp32 logits [len(sample), V] of the sampled rows (the
    vocabulary's padding rows included), and per `score` entry the log-probabilities [n, V]."""

    logits: torch.Tensor | None
    score_logprobs: list[torch.Tensor]


@dataclass
class ScheduledForward:
    """A ForwardBatch and the sequences of its rows (in row order)."""

    batch: ForwardBatch
    seqs: list[SequenceState]
    prefill: bool

    @property
    def sampled(self) -> list[SequenceState]:
        return [self.seqs[i] for i in self.batch.sample]


@dataclass
class SchedulerOutput:
    """One engine step's plan: the requests admitted, then the forwards in order (prompt chunks bucketed by
    length, then one decode forward of every running request whose prompt is in the cache)."""

    admitted: list[SequenceState]
    forwards: list[ScheduledForward]

    @property
    def empty(self) -> bool:
        return not self.forwards
