"""Evaluation: batched teacher-forced scoring of targets and the benchmark metrics built on it."""
