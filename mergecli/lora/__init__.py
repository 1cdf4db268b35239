"""LoRA adapters made from full models: truncated SVD of each task vector (`factor`), the
streaming extraction (`extract`), and the adapter folder it writes (`write`)."""
