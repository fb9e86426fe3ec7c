"""--model-file of the stock-handler archive: TorchServe's BaseHandler builds ``DigitCNN()`` from the one class
defined here and loads the mnist weights (artifacts/mnist/model.pt) into it.

The class is the bundle's own network (models/mnist.py, shipped in the archive), subclassed so that this module
defines exactly one class, as TorchServe requires of a model file. Its default arguments are those of the trained
artifact (width 32), so the state_dict loads as is.
"""

from models.mnist import DigitCNN as _BundleDigitCNN


class DigitCNN(_BundleDigitCNN):
    """models.mnist.DigitCNN with its default arguments."""
