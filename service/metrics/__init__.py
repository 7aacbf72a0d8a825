"""Evaluation metrics: pure functions, arrays/tensors in, floats out (SPEC §6.5, §7.4)."""
