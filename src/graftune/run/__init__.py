"""Run services: what every recipe shares. The run directory and its atomic assembly (``rundir``), the log,
progress bars and trackers (``log``), peak memory (``memory``), checkpoints (``checkpoint``), scoring a model in
memory (``scoring``) and a run loaded back for prediction (``loaded``). Recipes (``graftune.recipes``) build on
these; nothing here knows a recipe.
"""
