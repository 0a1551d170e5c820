"""The two model families built from the layers: `cifar` (the paper's CIFAR/SVHN ResNets, depth
6n+2) and `imagenet` (bottleneck ResNet-50/101/152: the paper's ImageNet net and composer's)."""
