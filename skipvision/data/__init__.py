"""Data: synthetic shapes VQA, tokenizer, WebDataset pipeline, collate."""
