"""Training scripts: `python -m train.<model>` writes the artifact folder that handlers/<model>.py serves (registry.py
lists them). Training never imports TorchServe."""
