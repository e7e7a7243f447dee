"""Training on healthy volumes: data, augmentation, the loop, checkpoints, packaging."""
