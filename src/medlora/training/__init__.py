"""Training: what a run starts from (inputs.py), the recipe (recipe.py), the Trainer it drives (trainer.py), its
loss (losses.py) and its callbacks (callbacks.py: progress, checkpoints, Ctrl-C and SIGTERM)."""
