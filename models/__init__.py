"""Hybrid decoders and vision-language models built from layout strings."""
