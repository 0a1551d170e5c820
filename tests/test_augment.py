import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.data import augment


def numpy_shift(image, dy, dx):
    """Reference: the image moved by (dy, dx) with zero fill, written with explicit index ranges."""
    h, w, _ = image.shape
    out = np.zeros_like(image)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[max(-dy, 0):h - max(dy, 0),
                                                                      max(-dx, 0):w - max(dx, 0)]
    return out


def test_translate_matches_a_zero_filled_shift():
    images = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    draws = augment.random_draws(jax.random.key(1), 16, 3, flip=False)
    out = np.asarray(augment.translate(jnp.asarray(images), draws["offsets"], 3))
    offsets = np.asarray(draws["offsets"])
    assert offsets.min() >= 0 and offsets.max() <= 6 and len(np.unique(offsets)) > 3
    for image, result, (oy, ox) in zip(images, out, offsets):
        np.testing.assert_array_equal(result, numpy_shift(image, 3 - oy, 3 - ox))


def test_flip_mirrors_the_chosen_images_only():
    images = np.random.default_rng(0).normal(size=(64, 4, 5, 2)).astype(np.float32)
    draws = augment.random_draws(jax.random.key(2), 64, 0, flip=True)
    out = np.asarray(augment.flip(jnp.asarray(images), draws["flips"]))
    flips = np.asarray(draws["flips"])
    assert 10 < flips.sum() < 54
    np.testing.assert_array_equal(out[flips], images[flips][:, :, ::-1])
    np.testing.assert_array_equal(out[~flips], images[~flips])
    assert not np.asarray(augment.random_draws(jax.random.key(2), 64, 0, flip=False)["flips"]).any()


def test_training_batch_normalises_with_given_statistics():
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    mean, std = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.3], np.float32)
    indices = jnp.array([3, 7])
    draws = augment.random_draws(jax.random.key(0), 2, 0, flip=False)
    x, y = augment.training_batch(jnp.asarray(images), jnp.arange(10), indices, draws, mean, std, 0, jnp.float32)
    np.testing.assert_allclose(x, (images[[3, 7]] / 255.0 - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y, [3, 7])
