"""A Hugging Face tokenizer directory (`tokenizer.json` + `tokenizer_config.json`) behind llmkiln's
`Tokenizer` interface, through the `tokenizers` library (no `transformers` import, no downloads).

The fingerprint is the sha256 of the `tokenizer.json` bytes. bos/eos/pad come from
`tokenizer_config.json` (or `special_tokens_map.json`); pad falls back to eos as HF does for
decoder-only models. Documents are encoded without the post-processor's special tokens: the jobs
add EOS (and BOS when asked) themselves, so every tokenizer behaves the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from dataprep import special_tokens as st
from dataprep.tokenizer import fingerprint_bytes
from kiln.errors import DataError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
HF_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)


def _token_text(value: Any) -> str | None:
    """A special token as configs write it: a string, or an AddedToken object with `content`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFTokenizer:
    """A `tokenizers.Tokenizer` with the special ids of its config; picklable for Beam."""

    def __init__(self, tokenizer_json: bytes, config: dict[str, Any], name: str = "hf") -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._json = tokenizer_json
        self._config = config
        self.name = name
        self.fingerprint = fingerprint_bytes(tokenizer_json)
        self.tk = _Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id("bos_token")
        eos = self._special_id("eos_token")
        if eos is None:
            raise DataError(f"tokenizer '{name}': no eos_token in {TOKENIZER_CONFIG} or "
                            f"{SPECIAL_TOKENS_MAP} that is in the vocabulary",
                            field="eos_token")
        self.eos_id = eos
        pad = self._special_id("pad_token")
        self.pad_id = pad if pad is not None else eos
        self.unk_id = self._special_id("unk_token")
        self._control = {tok: self._piece_ids(tok) for tok in st.CHAT_TOKENS}

    @classmethod
    def load(cls, directory: str) -> HFTokenizer:
        from kiln.paths import exists, join, read_bytes, read_text

        config: dict[str, Any] = {}
        for fname in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):  # tokenizer_config wins
            path = join(directory, fname)
            if exists(path):
                try:
                    data = json.loads(read_text(path))
                except ValueError as exc:
                    raise DataError(f"not valid JSON: {exc}", path=path) from None
                config.update({k: v for k, v in data.items() if k.endswith("_token")})
        name = os.path.basename(os.path.normpath(directory)) or directory
        return cls(read_bytes(join(directory, TOKENIZER_JSON)), config, name=name)

    def _special_id(self, key: str) -> int | None:
        text = _token_text(self._config.get(key))
        return None if text is None else self.tk.token_to_id(text)

    def _piece_ids(self, token: str) -> list[int]:
        tid = self.tk.token_to_id(token)
        return [tid] if tid is not None else self.encode(token)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # `tokenizers` parallelism is process-wide (RAYON / TOKENIZERS_PARALLELISM), not per call.
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def control(self, token: str) -> list[int]:
        return self._control[token]

    @property
    def tokenizer_json(self) -> bytes:
        return self._json

    @property
    def special_ids(self) -> dict[str, int | None]:
        return {"pad": self.pad_id, "unk": self.unk_id, "bos": self.bos_id, "eos": self.eos_id,
                **{tok: (ids[0] if len(ids) == 1 and self.tk.token_to_id(tok) is not None
                         else None) for tok, ids in self._control.items()}}

    def __getstate__(self) -> dict:
        return {"json": self._json, "config": self._config, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["json"], state["config"], state["name"])
