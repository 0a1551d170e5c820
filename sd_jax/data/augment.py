"""On-device input pipeline: batch selection, normalisation, random translation and flips, and
ImageNet's colour jitter and PCA lighting, all jittable.

The random draws are made for the whole global batch and then sliced, so every device count sees
the same augmentation of the same images.
"""
import jax
import jax.numpy as jnp

# fb.resnet.torch, datasets/imagenet.lua: ImageNet's RGB principal components for pixels in [0, 1]
# (`pca.eigval`, `pca.eigvec`, columns the eigenvectors), used by its Lighting transform.
PCA_EIGENVALUES = (0.2175, 0.0188, 0.0045)
PCA_EIGENVECTORS = ((-0.5675, 0.7192, 0.4009),
                    (-0.5808, -0.0045, -0.8140),
                    (-0.5836, -0.6948, 0.4203))
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # fb.resnet.torch datasets/transforms.lua, `grayscale`


def to_unit(images_u8):
    """uint8 -> float32 in [0, 1]."""
    return images_u8.astype(jnp.float32) / 255.0


def standardize(images, mean, std, dtype=jnp.float32):
    """Float images in [0, 1] -> per-channel standardised with the training split's statistics."""
    return ((images - mean) / std).astype(dtype)


def normalize(images_u8, mean, std, dtype=jnp.float32):
    """uint8 NHWC -> float, per-channel standardised with the training split's statistics."""
    return standardize(to_unit(images_u8), mean, std, dtype)


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


def colour_draws(key, batch_size: int, jitter: float, lighting_std: float) -> dict:
    """Per-image draws of fb.resnet.torch's ColorJitter and Lighting (datasets/transforms.lua):
    the order of brightness, contrast and saturation (`RandomOrder`: a permutation), their factors
    1 + U(-jitter, jitter), and the lighting's N(0, lighting_std) weight of each principal component."""
    order_key, factor_key, lighting_key = jax.random.split(key, 3)
    return {"order": jnp.argsort(jax.random.uniform(order_key, (batch_size, 3)), axis=1),
            "factors": 1.0 + jax.random.uniform(factor_key, (batch_size, 3), minval=-jitter, maxval=jitter),
            "lighting": lighting_std * jax.random.normal(lighting_key, (batch_size, 3))}


def _grayscale(image):
    return image @ jnp.asarray(GRAY_WEIGHTS, image.dtype)


def _brightness(image, factor):  # blend with black
    return image * factor


def _contrast(image, factor):  # blend with the image's mean gray
    return image * factor + (1 - factor) * jnp.mean(_grayscale(image))


def _saturation(image, factor):  # blend with the pixel's gray
    return image * factor + (1 - factor) * _grayscale(image)[..., None]


COLOUR_TRANSFORMS = (_brightness, _contrast, _saturation)  # ColorJitter's order before RandomOrder


def colour_jitter(images, order, factors):
    """fb.resnet.torch's ColorJitter on float NHWC images in [0, 1], as there without clipping:
    image i gets brightness, contrast and saturation (transform k with factor factors[i, k]) in the
    order order[i]."""
    def one(image, order, factors):
        for position in range(3):
            image = jax.lax.switch(order[position], COLOUR_TRANSFORMS, image, factors[order[position]])
        return image

    return jax.vmap(one)(images, order, factors)


def lighting(images, weights):
    """fb.resnet.torch's Lighting (AlexNet's PCA noise): add to image i the RGB offset
    sum_j eigenvector_j * weights[i, j] * eigenvalue_j."""
    offsets = (jnp.asarray(PCA_EIGENVECTORS) * (weights[:, None, :] * jnp.asarray(PCA_EIGENVALUES))).sum(-1)
    return images + offsets[:, None, None, :].astype(images.dtype)


def recolour(images, draws, jitter: bool):
    """fb.resnet.torch's colour steps between the crop and the normalisation
    (datasets/imagenet.lua): ColorJitter when `jitter`, then Lighting, with `colour_draws`' draws."""
    if jitter:
        images = colour_jitter(images, draws["order"], draws["factors"])
    return lighting(images, draws["lighting"])
