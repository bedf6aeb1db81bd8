"""`python -m nexus VERB ...` — the same as the `nexus` console script."""

from .cli import main

if __name__ == "__main__":
    main()
