"""The special tokens and chat roles, as declared in the shared contract `schemas.chat`."""

from schemas.chat import (  # noqa: F401
    ASSISTANT,
    BOS,
    BOS_ID,
    CHAT_TOKENS,
    END_OF_TURN,
    EOS,
    EOS_ID,
    FIXED_IDS,
    PAD,
    PAD_ID,
    ROLE_TOKENS,
    SYSTEM,
    UNK,
    UNK_ID,
    USER,
)
