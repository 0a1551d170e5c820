"""On-device input pipeline: batch selection, normalisation, random translation and flips, all jittable.

The random draws are made for the whole global batch and then sliced, so every device count sees
the same augmentation of the same images.
"""
import jax
import jax.numpy as jnp


def normalize(images_u8, mean, std, dtype=jnp.float32):
    """uint8 NHWC -> float, per-channel standardised with the training split's statistics."""
    return ((images_u8.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def random_draws(key, batch_size: int, max_shift: int, flip: bool) -> dict:
    """Per-example translation offsets in [0, 2 * max_shift] and flip decisions for one batch."""
    shift_key, flip_key = jax.random.split(key)
    flips = (jax.random.bernoulli(flip_key, 0.5, (batch_size,)) if flip
             else jnp.zeros((batch_size,), bool))
    return {"offsets": jax.random.randint(shift_key, (batch_size, 2), 0, 2 * max_shift + 1), "flips": flips}


def translate(images, offsets, max_shift: int):
    """Shift image i by offsets[i] - max_shift px (rows, columns), filling with zeros.

    As in the paper's Torch pipeline (normalise, then zero-pad and crop), zero is the mean colour.
    """
    if max_shift == 0:
        return images
    _, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


def flip(images, flips):
    """Mirror image i horizontally where flips[i]."""
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)


def training_batch(images_u8, labels, indices, draws, mean, std, max_shift: int, dtype):
    """Gather the images at `indices` from the on-device dataset and augment them with `draws`."""
    x = normalize(images_u8[indices], mean, std, dtype)
    x = flip(translate(x, draws["offsets"], max_shift), draws["flips"])
    return x, labels[indices]
