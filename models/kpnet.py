"""KPNet: the keypoint regressor of HUDD's FLD case study (one output map per keypoint)."""
import torch.nn.functional as F
from torch import nn


class KPNet(nn.Module):
    """1xSxS image -> K keypoint maps at input resolution; ReLU applied functionally, as the original.

    `width` scales every channel count (1.0 = the original 96/192/224/128), so that a small
    case study trains on a CPU; the faithful values are the defaults.
    """

    def __init__(self, num_keypoints=27, in_channels=1, input_size=128, width=1.0):
        super().__init__()
        c1, c2, c3, c4 = (max(4, int(round(c * width))) for c in (96, 192, 224, 128))
        self.input_size = input_size
        self.conv2d_1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2d_2 = nn.Conv2d(c1, c1, 3, padding=1)
        self.maxpool_1 = nn.MaxPool2d(2)
        self.conv2d_3 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv2d_4 = nn.Conv2d(c2, c2, 3, padding=1)
        self.maxpool_2 = nn.MaxPool2d(2)
        self.conv2d_5 = nn.Conv2d(c2, c3, 3, padding=1)
        self.conv2d_6 = nn.Conv2d(c3, c3, 1)
        self.conv2d_trans_1 = nn.ConvTranspose2d(c3, c4, 2, stride=2, bias=False)
        self.conv2d_trans_2 = nn.ConvTranspose2d(c4, num_keypoints, 2, stride=2, bias=False)

    def forward(self, x):
        x = F.relu(self.conv2d_1(x))
        x = self.maxpool_1(F.relu(self.conv2d_2(x)))
        x = F.relu(self.conv2d_3(x))
        x = self.maxpool_2(F.relu(self.conv2d_4(x)))
        x = F.relu(self.conv2d_5(x))
        x = F.relu(self.conv2d_6(x))
        x = F.relu(self.conv2d_trans_1(x))
        return self.conv2d_trans_2(x)
