"""MLflow: tracking, the model registry, secret scrubbing, and the register stage. (The artifact
store is ``store/``.)"""
