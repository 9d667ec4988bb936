"""Evaluation: scoring models, comparison tables, plots, lm-evaluation-harness."""
