"""The recipe, the stage sequence and its runners, the Prefect flows, the ``factory`` command line."""
