"""The distributed stages of the workflow (Ray Data, Train, Tune, Serve) and the ``lesion`` command line."""
