"""The data library: per-record logic (crawl, extract, language id, filters, PII, tokenizer, chat
template, formats) as plain functions, and the composite Beam transforms built from them."""
