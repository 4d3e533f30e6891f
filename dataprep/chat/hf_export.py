"""A Hugging Face tokenizer equivalent to a llmkiln sentencepiece tokenizer, carrying the chat
template as Jinja (for `export-hf`, and for checking our preprocessing against TRL's). Needs
`transformers` (the dev/train extras)."""

from __future__ import annotations

from dataprep import special_tokens as st
from dataprep.chat.template import CHAT_TEMPLATE_JINJA
from dataprep.tokenizer import SentencePieceTokenizer


def hf_tokenizer(tok: SentencePieceTokenizer):
    """`PreTrainedTokenizerFast` that encodes like `tok` (sentencepiece's normaliser, a dummy
    prefix on every chunk between special tokens) with the chat tokens as special tokens and
    `CHAT_TEMPLATE_JINJA` as its chat template; adds no bos/eos on its own."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter
    from transformers.utils import sentencepiece_model_pb2_new as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(tok.model_proto)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # legacy=True: every chunk between special tokens gets the dummy prefix, as our template
    # encodes each content on its own
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=st.BOS, eos_token=st.EOS,
                                 pad_token=st.PAD, unk_token=st.UNK,
                                 extra_special_tokens=list(st.CHAT_TOKENS))
    hf.chat_template = CHAT_TEMPLATE_JINJA
    return hf
