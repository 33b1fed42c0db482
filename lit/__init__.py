"""Training stages, data and the ``hybridvl`` command line."""
