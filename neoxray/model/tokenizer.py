"""The GPT-NeoX tokenizer: load one (a file, a folder or a Hugging Face hub id), train one, save one.

`Tokenizer` is a thin wrapper around a Hugging Face `tokenizers.Tokenizer` (byte-level BPE for GPT-NeoX), with
the ids the model pipeline needs (`eod_id`, `pad_id`) and a `save` that writes a folder which
`transformers.AutoTokenizer.from_pretrained` loads as a GPT-NeoX tokenizer.

`train_tokenizer` trains a new byte-level BPE in the GPT-NeoX style (NFC, byte-level pre-tokenizer without a
prefix space, `<|endoftext|>` = 0, `<|padding|>` = 1) from an iterator of texts, streaming.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from neoxray.errors import NeoxrayError

EOD_TOKEN = "<|endoftext|>"
"""End of document; GPT-NeoX also uses it as BOS and UNK."""
PAD_TOKEN = "<|padding|>"
TOKENIZER_FILE = "tokenizer.json"
SAVED_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
"""What `Tokenizer.save` writes into a folder."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Tokenizer:
    """A byte-level BPE tokenizer (GPT-NeoX style) backed by a `tokenizers.Tokenizer`."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "<in memory>"):
        self.backend = backend
        self.source = source
        """Where it was loaded from (a path or hub id), for messages."""
        eod = backend.token_to_id(EOD_TOKEN)
        if eod is None:
            raise NeoxrayError(f"tokenizer {source}: its vocabulary has no {EOD_TOKEN} token")
        self.eod_id: int = eod
        pad = backend.token_to_id(PAD_TOKEN)
        self.pad_id: int = eod if pad is None else pad

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Token ids of each text (encoded in parallel by the backend); no special tokens are added."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Special tokens such as <|endoftext|> are kept unless `skip_special_tokens`."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The tokenizer.json text, exactly as `save` writes it."""
        return self.backend.to_str()

    @cached_property
    def sha256(self) -> str:
        """Hex sha256 of the tokenizer.json that `save` writes: identifies the tokenizer in checkpoints."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def _is_gpt_neox_pipeline(self) -> bool:
        """True when transformers' GPT-NeoX tokenizer class reproduces this tokenizer exactly.

        Recent transformers rebuild that class's pipeline from the vocabulary and merges alone (NFC, byte-level
        without prefix space); any other pipeline must be saved for the generic fast tokenizer instead.
        """
        spec = json.loads(self.to_json())

        def kind(part: str) -> str | None:
            return (spec.get(part) or {}).get("type")

        pre = spec.get("pre_tokenizer") or {}
        return (
            kind("model") == "BPE"
            and kind("normalizer") == "NFC"
            and kind("pre_tokenizer") == "ByteLevel"
            and not pre.get("add_prefix_space", False)
            and pre.get("use_regex", True)
            and kind("decoder") == "ByteLevel"
        )

    def save(
        self, directory: str | os.PathLike, model_max_length: int | None = None, chat_template: str | None = None
    ) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`.

        `transformers.AutoTokenizer.from_pretrained(directory)` then loads it as a GPT-NeoX fast tokenizer
        (bos/eos/unk = <|endoftext|>, no BOS/EOS added). `model_max_length` is recorded when given, and
        `chat_template` (a Jinja template's text) as tokenizer_config.json's `chat_template`, where transformers'
        `apply_chat_template` and `neoxray.model.chat_template.load_chat_template` find it. Returns the directory.
        """
        out = Path(directory)
        eod = EOD_TOKEN
        pad = PAD_TOKEN if self.backend.token_to_id(PAD_TOKEN) is not None else EOD_TOKEN
        special = {"bos_token": eod, "eos_token": eod, "unk_token": eod, "pad_token": pad}
        config = {
            "tokenizer_class": "GPTNeoXTokenizerFast" if self._is_gpt_neox_pipeline() else "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
        }
        if model_max_length is not None:
            if model_max_length <= 0:
                raise NeoxrayError(f"model_max_length must be positive, got {model_max_length}")
            config["model_max_length"] = int(model_max_length)
        if chat_template is not None:
            config["chat_template"] = chat_template
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / TOKENIZER_FILE).write_text(self.to_json(), encoding="utf-8")
            for name, obj in zip(SAVED_FILES[1:], (config, special)):
                (out / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        except (FileExistsError, NotADirectoryError):
            raise NeoxrayError(f"cannot save tokenizer: {out} exists and is not a directory") from None
        except OSError as e:
            raise NeoxrayError(f"cannot save tokenizer to {out}: {e.strerror or e}") from None
        return out

    @classmethod
    def load(cls, source: str | os.PathLike) -> Tokenizer:
        """Load from a folder holding tokenizer.json, a tokenizer.json file, or a hub id like EleutherAI/gpt-neox-20b.

        The hub is only asked when `source` is not an existing path and looks like owner/name.
        """
        text = os.fspath(source)
        path = Path(text).expanduser()
        if path.is_dir():
            file = path / TOKENIZER_FILE
            if not file.is_file():
                raise NeoxrayError(f"tokenizer folder {path} has no {TOKENIZER_FILE}")
        elif path.exists():
            file = path
        elif _HUB_ID.match(text):
            file = _download_from_hub(text)
        else:
            raise NeoxrayError(f"tokenizer {text}: no such file or directory")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for bad JSON / unknown formats
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise NeoxrayError(f"tokenizer file {file} is not a valid tokenizer.json: {first_line}") from None
        return cls(backend, source=text)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, TOKENIZER_FILE))
    except GatedRepoError:
        raise NeoxrayError(f"tokenizer {repo_id}: the hub repository is gated (log in and accept its terms)") from None
    except RepositoryNotFoundError:
        raise NeoxrayError(
            f"tokenizer {repo_id}: no such file or directory, and no such repository on the Hugging Face hub"
        ) from None
    except EntryNotFoundError:
        raise NeoxrayError(f"tokenizer {repo_id}: the hub repository has no {TOKENIZER_FILE}") from None
    except Exception as e:  # offline, DNS, timeouts, proxy errors...
        raise NeoxrayError(
            f"tokenizer {repo_id}: no such file or directory, and the Hugging Face hub could not be reached "
            f"({type(e).__name__})"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# training


def _new_gpt_neox_bpe() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a GPT-NeoX-style byte-level BPE on `texts` (any iterable of documents, consumed once, streaming) and
    return it (not saved). `<|endoftext|>` gets id 0, `<|padding|>` id 1. Reading documents from files or Pile
    shards is the data pipeline's job (`neoxray.pipelines.tokenizer_training`)."""
    min_size = 256 + 2
    if vocab_size < min_size:
        raise NeoxrayError(f"vocab_size must be at least {min_size} (256 bytes + 2 special tokens), got {vocab_size}")
    if min_frequency < 0:
        raise NeoxrayError(f"min_frequency must be >= 0, got {min_frequency}")
    backend = _new_gpt_neox_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)
