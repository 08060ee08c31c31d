"""Artifact store and MLflow tracking / model registry."""
