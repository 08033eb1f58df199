"""Small array operations used by the models and evaluation (box ops)."""
