"""Structured output in the inference engine: a request's `StructuredOutput` (`neoxray.platform.inference.request`:
any JSON object, a JSON schema, a regex, a choice of strings, a Lark grammar) compiled by llguidance into a
grammar over the model's tokens, and a matcher per sequence that says which tokens may come next.

- `GrammarCompiler`: one per engine: the tokenizer as llguidance sees it (over the model's padded vocabulary:
  rows past the tokenizer's have no bytes, so no grammar ever allows them), `compile` (on intake: a spec that
  cannot be compiled is an `InvalidRequest` naming the API field, before anything streams; compiled grammars
  kept in a bounded least-recently-used cache, since clients repeat their schemas), `matcher` (a fresh
  `SequenceGrammar` for one sequence: a copy of the cached one, so n choices each advance their own), and
  `fill_bitmask` (the packed masks of a batch's constrained rows, computed by llguidance's thread pool).
- `SequenceGrammar`: one sequence's matcher, advanced with each token it samples; `done` once the text is
  complete and nothing may follow (the request then ends with 'stop', whether or not it stops at end of
  document).

The output processor applies the masks (`neoxray.model.decoding.apply_token_bitmask`) to the rows that have a
grammar, after the logits were gathered (tensor-parallel workers return whole rows), before the sampling
controls; rows without one are untouched and cost nothing.

Why llguidance rather than xgrammar (both maintained, both backends of vLLM; xgrammar is vLLM's and SGLang's
default, llguidance is vLLM's `guidance` backend and also used by SGLang, llama.cpp and outlines): llguidance's
wheel (3 MB, one abi3 build for every Python) needs no other package, where xgrammar 0.2.9 requires torch,
transformers (only a test dependency here), triton and apache-tvm-ffi. A JSON schema keyword llguidance cannot
enforce is refused by name ('Unimplemented keys: ["uniqueItems"]'), so whatever it compiles validates; xgrammar
0.2.9 accepted `uniqueItems`, `not` and `if`/`then` and generated documents that break them, and by default
treats a schema without `additionalProperties` as closed. Its compile errors are one clear line ('Unsatisfiable
schema: minimum (5) is greater than maximum (1)') where xgrammar's carry C++ source locations, and compiling is
lazy (1-10 ms for our test schemas against 25-60 ms). xgrammar's masks are cheaper per token (GPT-NeoX's 50k
vocabulary on this CPU: median 0.02 ms against 0.12 ms, mean 0.04 against 0.6 ms for a schema with bounded
strings), a cost docs/benchmarks.md measures against a whole decoding step.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import torch

from neoxray.platform.inference.request import InvalidRequest, StructuredOutput

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How JSON is written: no free whitespace (a model could otherwise spend its whole budget on blanks), with
`json.dumps`'s separators, the way most JSON a model has read is spelled."""


class GrammarCompiler:
    """llguidance's view of one engine's tokenizer, and the grammars compiled against it."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 64):
        """`tokenizer`: a `neoxray.model.tokenizer.Tokenizer` (its tokenizer.json is what llguidance reads; its
        end of document is what a grammar allows once its text is complete); `vocab_size`: the width of the
        model's logits (the padded vocabulary). llguidance reads the tokenizer on the first compile (a 50k
        vocabulary takes a few tenths of a second), so engines that never see a grammar do not pay for it."""
        self._source = tokenizer
        self.vocab_size = vocab_size
        self.eod_id: int = tokenizer.eod_id
        self.cache_size = cache_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # key -> a matcher at the start
        self._lock = threading.Lock()  # compile runs on callers' threads, matcher on the engine's
        self._executor: llguidance.LLExecutor | None = None
        self.words = (vocab_size + 31) // 32
        """int32 words of one row's packed mask."""

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(
                    self._source.to_json(), n_vocab=self.vocab_size, eos_token=self.eod_id
                )
                self._executor = llguidance.LLExecutor()
            return self._tokenizer

    def compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """The compiled grammar of `spec` (a matcher at its start; cached). Raises InvalidRequest naming
        `spec.param` for a spec llguidance cannot compile, with llguidance's reason in one line."""
        spec.validate()
        key = _key(spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            grammar = _grammar(spec)
        except (ValueError, TypeError) as e:
            reason = _one_line(str(e))
            raise InvalidRequest(f"{spec.param}: {_what(spec)} cannot be compiled: {reason}", spec.param) from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            reason = _one_line(matcher.get_error())
            raise InvalidRequest(f"{spec.param}: {_what(spec)} cannot be compiled: {reason}", spec.param)
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, spec: StructuredOutput) -> SequenceGrammar:
        """A new matcher of `spec` for one sequence."""
        return SequenceGrammar(self.compile(spec).deep_copy())

    def fill_bitmask(self, grammars: list[SequenceGrammar]) -> torch.Tensor:
        """The packed masks [len(grammars), words] int32 of what may come next in each (bit j of word w: token
        32w + j), computed in parallel on llguidance's threads."""
        bitmask = torch.zeros((len(grammars), self.words), dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(g.matcher, i) for i, g in enumerate(grammars)], bitmask.data_ptr(), self.words * 4, len(grammars)
        )
        return bitmask


class SequenceGrammar:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def advance(self, token: int) -> str | None:
        """Take the token the sequence sampled; returns why the matcher refused it (None: taken). A masked
        sample is always taken, the end of document included once the text is complete."""
        if self.matcher.consume_token(token):
            return None
        return _one_line(self.matcher.get_error()) or f"token {token} is not allowed here"

    @property
    def done(self) -> bool:
        """The text is complete and nothing may follow it (only the end of document could)."""
        return self.matcher.is_stopped()


def _grammar(spec: StructuredOutput) -> str:
    """llguidance's grammar for a spec (not yet checked: the matcher built from it says whether it works)."""
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec.value), defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(list(spec.value)))
    return llguidance.grammar_from("grammar", spec.value)  # Lark, or llama.cpp's GBNF


def _key(spec: StructuredOutput) -> str:
    try:
        return json.dumps([spec.kind, spec.value], sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"{spec.param}: {_what(spec)} is not JSON: {e}", spec.param) from None


def _what(spec: StructuredOutput) -> str:
    return {"json_object": "the JSON object grammar", "json_schema": "the JSON schema"}.get(
        spec.kind, f"the {spec.kind}"
    )


def _one_line(message: str) -> str:
    """llguidance's message in one line: its first line and the line that says what is wrong, without the
    excerpts of the grammar and the carets under them."""
    lines = [ln.strip() for ln in message.strip().splitlines()]
    keep = [lines[0]] if lines else []
    keep += [ln for ln in lines[1:] if ln.startswith("error:")]
    return " ".join(keep)
