"""Models small enough to search in seconds on a shared CPU, with the couplings the search must keep:
a residual add (two producers in one channel set), a stride-2 conv, global pooling and a classifier."""

from __future__ import annotations

from torch import nn


class TinyResidualCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        x = (out + x).relu()  # residual add: stem and conv2 share one channel set
        x = self.down(x)
        return self.fc(self.dropout(self.pool(x).flatten(1)))


def tiny_residual_cnn(num_classes: int = 10) -> nn.Module:
    return TinyResidualCNN(num_classes)


def tiny_residual_cnn_dropout(num_classes: int = 10) -> nn.Module:
    """Dropout before the classifier (as MobileNetV2 has): a layer that draws from torch's global generator."""
    return TinyResidualCNN(num_classes, dropout=0.5)


def pretrain(model: nn.Module, images: int = 2048, epochs: int = 2, seed: int = 0) -> nn.Module:
    """A few seconds of real Fashion-MNIST training, so the search starts from a model that knows something."""
    import torch
    import torch.nn.functional as F

    from dyncompile.data import loader, open_dataset

    torch.manual_seed(seed)
    splits = open_dataset("fashion-mnist", input_shape=(1, 1, 28, 28), train_limit=images, val_limit=16, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for epoch in range(epochs):
        for x, y in loader(splits.train, 64, shuffle=True, seed=seed, epoch=epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()
