"""`nexus train`: distill the unmodified model into the shared experts (plus LM loss).

Pure components — `losses`, `schedule`, `checkpoint`, `optim` — are unit-tested on their own; the
data stream (`nexus.stream`) and the backbone / LM-head split (`nexus.forward`) sit below, shared
with precompute-teacher. `recipe.Trainer` puts them together (setup / train / save_checkpoint /
cleanup); `cli.train` and `cli.plot_metrics` are the verbs.
"""
