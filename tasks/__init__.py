"""Prefect tasks: thin wrappers over model/, compression/, sdg/ and registry/."""
