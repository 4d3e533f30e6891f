"""The text side of a model's tokenizer, for what the trainer decodes or encodes itself (`kiln
generate`, the texts RL reward functions receive): a `kiln tokenizer` directory (sentencepiece
`tokenizer.model`, llmkiln's chat layout) or a Hugging Face one (`tokenizer.json`, as `kiln
import-hf` copies it into `CKPT/tokenizer`; its own chat template through transformers)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from kiln.errors import UsageError
from schemas.chat import ASSISTANT, END_OF_TURN, USER


class TextTokenizer:
    """`encode` (a prompt, with the BOS the model was trained with), `decode`, `stop_ids`."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        has = {n: os.path.isfile(os.path.join(directory, n))
               for n in ("fingerprint.txt", "tokenizer.model", "tokenizer.json")}
        # a Hugging Face directory may ship a sentencepiece tokenizer.model too (Llama 2): its
        # tokenizer.json (special tokens, chat template beside it) is what the model expects
        self.hf = has["tokenizer.json"] and not has["fingerprint.txt"]
        if not self.hf and not has["tokenizer.model"]:
            raise UsageError(f"{directory} holds neither tokenizer.model (`kiln tokenizer`) "
                             "nor tokenizer.json (Hugging Face)")
        if self.hf:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        else:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(
                model_file=os.path.join(directory, "tokenizer.model"))
            self.vocab_size = self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        if self.hf:
            pad = self._special("pad_token")
            return pad if pad is not None else 0
        return max(self._sp.pad_id(), 0)

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Prompt ids: the text after BOS, or (`chat`) one user turn and the assistant's
        opening, in the tokenizer's own chat layout."""
        if self.hf:
            if not chat:
                return self._tok.encode(text, add_special_tokens=True).ids
            return self._hf_chat(text)
        sp = self._sp
        if not chat:
            return [sp.bos_id(), *sp.encode(text)]
        user, end, assistant = (sp.piece_to_id(p) for p in (USER, END_OF_TURN, ASSISTANT))
        if sp.unk_id() in (user, end, assistant):
            raise UsageError("--chat needs a tokenizer with llmkiln's chat control tokens")
        return [sp.bos_id(), user, *sp.encode(text), end, assistant]

    def stop_ids(self, chat: bool = False) -> list[int]:
        """Ids that end a completion: EOS (and, in a chat, the end of the assistant's turn)."""
        if self.hf:
            ids = {self._special("eos_token")} | set(self._generation_eos())
            return sorted(i for i in ids if i is not None)
        return [self._sp.eos_id()] + ([self._sp.piece_to_id(END_OF_TURN)] if chat else [])

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]  # numpy or tensor elements too
        if self.hf:
            return self._tok.decode(ids, skip_special_tokens=True)
        return self._sp.decode(ids)

    # ---- Hugging Face files -----------------------------------------------------------------
    def _config(self, name: str) -> dict[str, Any]:
        path = os.path.join(self.directory, name)
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def _special(self, key: str) -> int | None:
        token = self._config("tokenizer_config.json").get(key)
        if isinstance(token, dict):  # {"content": "<s>", ...}
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    def _generation_eos(self) -> list[int]:
        """`generation_config.json`'s eos_token_id (Llama 3 ends chat turns with <|eot_id|>),
        beside the tokenizer (`kiln import-hf` keeps it in CKPT/hf)."""
        for base in (self.directory, os.path.join(os.path.dirname(self.directory), "hf")):
            path = os.path.join(base, "generation_config.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    eos = json.load(f).get("eos_token_id")
                return [eos] if isinstance(eos, int) else list(eos or [])
        return []

    def _hf_chat(self, text: str) -> list[int]:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UsageError("--chat with a Hugging Face tokenizer applies its chat template "
                             "through transformers: pip install transformers") from None
        tok = AutoTokenizer.from_pretrained(self.directory)
        if not getattr(tok, "chat_template", None):
            raise UsageError(f"{self.directory} has no chat template (tokenizer_config.json)")
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        return self._tok.encode(rendered, add_special_tokens=False).ids
