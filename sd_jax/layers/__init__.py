"""The stochastic-depth layer and its parts: `stochastic_depth` (the gated residual connection),
`survival` (the survival probabilities p_l and the drop-rate warm-up), `batch_norm` (Torch's
BatchNorm with a padding mask) and `conv` (the 3x3 convolution with a hand-written backward pass)."""
