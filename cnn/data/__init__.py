"""Data: TFDS readers, on-device augmentation, synthetic canvases."""
