"""Hugging Face Hub interchange: diffusers/transformers layouts of our networks and tokenizers."""
