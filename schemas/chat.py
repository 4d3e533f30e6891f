"""The chat contract shared by the data jobs and the trainer: special tokens with their fixed
ids in every tokenizer llmkiln trains, the chat roles the template emits, and the same template
as a Jinja string for Hugging Face `apply_chat_template` (HF export, serving).

The token-span renderer that produces loss masks is `dataprep.chat.template`; this module only
declares what both sides must agree on.
"""

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

_HEADERS = ", ".join(f"'{role}': '{token}'" for role, token in ROLE_TOKENS.items())
CHAT_TEMPLATE_JINJA = (
    "{{ bos_token }}"
    f"{{% set headers = {{{_HEADERS}}} %}}"
    "{% for message in messages %}"
    "{% if message['role'] not in headers %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ headers[message['role']] }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    f"{{{{ message['content'] + '{END_OF_TURN}' }}}}"
    "{% if loop.last and not add_generation_prompt %}{{ eos_token }}{% endif %}"
    "{% endgeneration %}"
    f"{{% else %}}{{{{ message['content'] + '{END_OF_TURN}' }}}}{{% endif %}}"
    "{% endfor %}"
    f"{{% if add_generation_prompt %}}{{{{ '{ASSISTANT}' }}}}{{% endif %}}"
)
