"""``python -m stc``: the command line (also what ``accelerate launch -m stc`` runs)."""

from stc.cli import main

main()
