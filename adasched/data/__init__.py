"""Text in: corpora as HF datasets packed into fixed-length blocks, and the family's tokenizer."""
