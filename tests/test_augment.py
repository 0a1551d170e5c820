import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


# fb.resnet.torch datasets/transforms.lua, transcribed to numpy on one CHW image in [0, 1] with the
# random draws passed in (the Lua draws them inside: torch.uniform(-var, var), torch.randperm(3),
# torch.Tensor(3):normal(0, alphastd)). The ImageNet constants are datasets/imagenet.lua's `pca`.
LUA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
LUA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def lua_blend(img1, img2, alpha):  # img1:mul(alpha):add(1 - alpha, img2)
    return img1 * alpha + (1 - alpha) * img2


def lua_grayscale(img):  # dst[1] = 0.299 img[1] + 0.587 img[2] + 0.114 img[3], copied to dst[2], dst[3]
    gray = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    return np.stack([gray, gray, gray])


def lua_brightness(img, alpha):  # gs:resizeAs(input):zero()
    return lua_blend(img, np.zeros_like(img), alpha)


def lua_contrast(img, alpha):  # gs:fill(gs[1]:mean())
    return lua_blend(img, np.full_like(img, lua_grayscale(img)[0].mean()), alpha)


def lua_saturation(img, alpha):
    return lua_blend(img, lua_grayscale(img), alpha)


def lua_color_jitter(img, order, alphas):
    """M.ColorJitter: ts = {Brightness, Contrast, Saturation} (inserted in that order), then
    M.RandomOrder: ts[order[i]] for i = 1..3; each transform draws its alpha = 1 + uniform(-var, var)."""
    transforms = [lua_brightness, lua_contrast, lua_saturation]
    for index in order:
        img = transforms[index](img, alphas[index])
    return img


def lua_lighting(img, alpha):
    """M.Lighting: rgb = eigvec:clone():cmul(alpha:view(1,3):expand(3,3)):cmul(eigval:view(1,3):expand(3,3)):sum(2)."""
    rgb = (LUA_EIGVEC * alpha.reshape(1, 3) * LUA_EIGVAL.reshape(1, 3)).sum(1)
    out = img.copy()
    for i in range(3):
        out[i] += rgb[i]
    return out


def test_colour_jitter_and_lighting_match_fb_resnet_torch_transcribed():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (24, 6, 7, 3)).astype(np.float32)
    draws = jax.device_get(augment.colour_draws(jax.random.key(3), 24, 0.4, 0.1))
    assert {tuple(o) for o in draws["order"]} == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}
    assert np.abs(draws["factors"] - 1).max() <= 0.4 and np.abs(draws["factors"] - 1).max() > 0.3
    got = np.asarray(augment.lighting(augment.colour_jitter(jnp.asarray(images), draws["order"], draws["factors"]),
                                      draws["lighting"]))
    for image, result, order, factors, weights in zip(images, got, draws["order"], draws["factors"],
                                                      draws["lighting"]):
        chw = image.transpose(2, 0, 1).astype(np.float64)
        want = lua_lighting(lua_color_jitter(chw, order, factors), weights.astype(np.float64))
        np.testing.assert_allclose(result.transpose(2, 0, 1), want, rtol=0, atol=2e-6)


def test_colour_draws_are_stateless_and_the_lighting_spread_is_its_std():
    a = jax.device_get(augment.colour_draws(jax.random.key(5), 4096, 0.4, 0.1))
    b = jax.device_get(augment.colour_draws(jax.random.key(5), 4096, 0.4, 0.1))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the same key: the same draws (exact resume)
    assert np.std(a["lighting"]) == pytest.approx(0.1, rel=0.05)
    assert np.mean(a["factors"]) == pytest.approx(1.0, abs=0.01)
