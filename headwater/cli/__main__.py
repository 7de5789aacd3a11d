"""``python -m headwater.cli``: the same as the ``headwater`` command."""

from headwater.cli import main

main()
