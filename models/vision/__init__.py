"""The course's image classifiers (chapter 6), one module per family, in the style of kuangliu/pytorch-cifar.

Every constructor takes ``in_channels`` and ``num_classes`` (from the data), accepts any input size (global
average pooling before the classifier) and exposes ``cam_layer``: the module whose output is the last convolutional
feature map, which the handler's Grad-CAM explanations attribute to.
"""
