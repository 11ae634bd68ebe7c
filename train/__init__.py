"""genlab's shared train loop: `python -m train --config=... --workdir=...`."""
