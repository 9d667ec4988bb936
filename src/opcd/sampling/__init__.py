"""Sampling responses: HF / packed / vLLM rollout, and multi-turn episodes."""
