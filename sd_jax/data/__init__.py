"""The data, from files to augmented batches: `files` (readers for the official CIFAR/SVHN files),
`tfds` (tensorflow-datasets), `cifar_svhn` (the datasets as uint8 arrays with fixed splits and their
normalisation), `imagenet` (ImageNet as encoded images), `input_pipeline` (ImageNet's host-side
decode and crop) and `augment` (the on-device translations, flips and normalisation)."""
