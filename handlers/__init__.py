"""Model definitions, pre-processing and TorchServe handlers of the bundle."""
