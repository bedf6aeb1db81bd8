"""`nexus plan`: what a model needs, from its config alone. `core` computes the plan, `cli` is the verb."""
