"""On-device input pipeline: batch selection, normalisation, random translation and flips, all jittable."""
import jax
import jax.numpy as jnp


def normalize(images_u8, mean, std, dtype=jnp.float32):
    """uint8 NHWC -> float, per-channel standardised with the training split's statistics."""
    return ((images_u8.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def random_translate(key, images, max_shift: int):
    """Shift each image by up to `max_shift` px in each direction, filling with zeros.

    As in the paper's Torch pipeline (normalise, then zero-pad and crop), zero is the mean colour.
    """
    if max_shift == 0:
        return images
    n, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key, images):
    """Mirror each image horizontally with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def training_batch(key, images_u8, labels, indices, mean, std, translate: int, flip: bool, dtype):
    """Gather one training batch from the on-device dataset and augment it."""
    translate_key, flip_key = jax.random.split(key)
    x = normalize(images_u8[indices], mean, std, dtype)
    x = random_translate(translate_key, x, translate)
    if flip:
        x = random_flip(flip_key, x)
    return x, labels[indices]
