"""`nexus chat`: `session` holds the chat session (also used by `validate --chat`), `cli` is the verb."""
