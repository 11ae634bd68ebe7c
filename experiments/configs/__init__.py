"""One ml_collections config file per experiment; each docstring says how to run it and what to expect."""
