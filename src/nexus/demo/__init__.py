"""`nexus demo`: `report` holds its config and REPORT.md, `cli` is the verb."""
