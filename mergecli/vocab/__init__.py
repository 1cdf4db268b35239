"""Vocabularies: token maps, the output vocabulary, row re-indexing, tokenizer files, chat templates."""
