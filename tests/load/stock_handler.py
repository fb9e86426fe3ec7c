"""What a user gets out of the box: TorchServe's stock ``image_classifier`` handler, set up for 28x28 digits.

Like pytorch/serve's examples/image_classifier/mnist/mnist_handler.py, the subclass only replaces the image
transform (grayscale, 28x28, MNIST normalisation); decoding, batching, inference and the top-5 reply are
ImageClassifier's. The archive has no model-config.yaml, so TorchServe's defaults apply: batchSize 1, one worker
per CPU core, torch's default thread count. The weights are the bundle's mnist weights (stock_model.py).
"""

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class MNISTDigitClassifier(ImageClassifier):
    image_processing = transforms.Compose([
        transforms.Grayscale(),
        transforms.Resize((28, 28)),
        transforms.ToTensor(),
        transforms.Normalize((0.1307,), (0.3081,)),
    ])
