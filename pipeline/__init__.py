"""The experiment pipeline's stages (dvc.yaml): ``python -m pipeline.<stage>``, one thin script each."""
