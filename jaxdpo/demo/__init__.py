"""The built-in OCR study: rendered pages, their tokenizer, and the six-stage demo pipeline."""
