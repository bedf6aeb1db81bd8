"""`nexus train`: distill the unmodified model into the shared experts (plus LM loss).

Pure components — `losses`, `schedule`, `stream` (the data pipeline), `checkpoint`, `optim` — are
unit-tested on their own; `recipe.Trainer` puts them together (setup / train / save_checkpoint /
cleanup) and `cli` is the verb.
"""
