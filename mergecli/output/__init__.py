"""The output folder: atomic build, model card, manifest, resume records, side files."""
