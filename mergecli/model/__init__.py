"""Model structure read from tensor names and configs: layer stacks, tied embeddings."""
