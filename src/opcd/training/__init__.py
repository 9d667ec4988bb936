"""The training run and its one step: the loop, the trainer, a method's parts, the guard."""
