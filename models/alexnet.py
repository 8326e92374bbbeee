"""AlexNet as HUDD uses it: torchvision's layer names, no adaptive pooling, 3x256x256 input."""
import torch
from torch import nn


def _classifier(in_features, hidden, num_classes):
    return nn.Sequential(
        nn.Dropout(),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class AlexNet(nn.Module):
    """The faithful AlexNet: features.0-12 and classifier.0-6 as torchvision names them.

    At 256x256 the last feature map is 256x7x7, so fc1 is 12544->4096 (torchvision's is
    9216->4096): convolution weights load from torchvision checkpoints, fc1 does not.
    """

    def __init__(self, num_classes=8, input_size=256):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        side = _feature_side(self.features, 3, input_size)
        self.classifier = _classifier(256 * side * side, 4096, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class SmallAlexNet(nn.Module):
    """AlexNet's shape (5 convolutions, overlapping max-pools, 3 dense layers) for 28 to 64 px inputs.

    Small enough to train in minutes on two CPU cores; same module names as AlexNet so that
    heatmap layer numbering reads the same way. `batchnorm`: a BatchNorm2d after each convolution
    (which then has no bias), so that the net fits its training set; the LRP engine merges each
    one into its convolution, and the layer numbers then count the BatchNorm modules too.
    """

    def __init__(self, num_classes=10, in_channels=1, input_size=28, width=32, hidden=256, batchnorm=False):
        super().__init__()
        w = width
        layers = []
        for index, (cin, cout) in enumerate([(in_channels, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w),
                                             (4 * w, 4 * w)]):
            layers.append(nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            if index in POOLED_CONVS:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.features = nn.Sequential(*layers)
        side = _feature_side(self.features, in_channels, input_size)
        self.classifier = _classifier(4 * w * side * side, hidden, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


POOLED_CONVS = (0, 1, 4)    # AlexNet max-pools after its first, second and fifth convolutions


def _feature_side(features, in_channels, input_size):
    with torch.no_grad():
        out = features(torch.zeros(1, in_channels, input_size, input_size))
    if out.shape[-1] < 1:
        raise ValueError(f"input_size {input_size} is too small for this network")
    return out.shape[-1]
