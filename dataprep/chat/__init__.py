"""Chat data: format readers, the chat template, length policy, packing and hygiene for SFT,
preference, unpaired (KTO) and prompt-only datasets.

- `formats`: `iter_records(path)`, `detect_format(record)`, `parse_record(record, fmt, rule, key)`
  -> `Conversation` / `PreferencePair` / `UnpairedExample` / `PromptExample` (or `RecordError`,
  `RecordFiltered`); `PairingRule` for scored completions.
- `template`: `ChatTemplate(tok, TemplateOptions)` (`render`, `render_prompt`, `render_completion`,
  `encode_content`), `CHAT_TEMPLATE_JINJA`.
- `lengths`: `LengthPolicy`, `fit(prompt_turns, completions, policy)`, `TooLong`.
- `rows`: `render_conversation`, `render_preference`, `render_unpaired`, `render_prompt`,
  `example_row` (contract rows).
- `packing`: `pack_rows`, `unpack`, `packed_attention_mask`, `packed_position_ids`, `segment_ids`.
- `hygiene`: `content_key`, `Decontaminator`, `read_eval_prompts`.
- `hf_export`: `hf_tokenizer(tok)` (needs transformers) with the Jinja template.
"""
