"""Training scripts: python -m train.mnist | train.sentiment | train.regression."""
