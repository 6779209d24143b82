"""The built-in prior's world: its data renderer, tokenizer, evaluation and shipped weights (model/)."""
