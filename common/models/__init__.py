"""Models: names and loading/saving, the adapter table of families, structure (masks, reshape, pruning.json), the model kinds, the code a model dir carries."""
