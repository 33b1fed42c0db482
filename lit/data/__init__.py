"""Training data: conversation sources (LLaVA/ShareGPT JSON, the synthetic suite), encoding, packing."""
