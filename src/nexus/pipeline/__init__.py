"""`nexus pipeline`: `runner` runs the stages of one YAML file, `cli` is the verb."""
