"""Training scripts: `python -m train.<model>` writes the artifact folder that handlers/<model>.py serves."""

import logging

# handlers/<model>.py import TorchServe's BaseHandler, which warns at import time about optional accelerators
# (OpenVINO, ONNX Runtime, TensorRT) that training never uses; keep the CLI's output to training progress.
logging.getLogger("ts.torch_handler.base_handler").setLevel(logging.ERROR)
