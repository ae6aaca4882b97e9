"""`python -m phitune ...`: the same as the `phitune` command (for environments where its script is not on PATH)."""

from phitune.cli import main

main()
