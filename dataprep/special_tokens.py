"""The special tokens, declared once: fixed ids in every tokenizer llmkiln trains, and the chat
roles the SFT/preference template emits."""

from __future__ import annotations

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# Chat control tokens, one piece each, right after the four above (ids 4..7).
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS: tuple[str, ...] = (SYSTEM, USER, ASSISTANT, END_OF_TURN)
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# What a tokenizer must map to these exact ids (checked when a tokenizer is trained or adopted).
FIXED_IDS: dict[str, int] = {PAD: PAD_ID, UNK: UNK_ID, BOS: BOS_ID, EOS: EOS_ID,
                             **{tok: 4 + i for i, tok in enumerate(CHAT_TOKENS)}}
