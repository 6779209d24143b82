"""Shared test fixtures. Tests never touch the network: HF_HUB_OFFLINE is set before any import."""

import os

# Set at import time, before transformers / huggingface_hub read it into their constants.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _embedding_cache(tmp_path_factory):
    """Keep text-embedding caches out of ~/.cache during tests."""
    os.environ["TEXT23D_CACHE"] = str(tmp_path_factory.mktemp("text23d_cache"))


@pytest.fixture(scope="session")
def tiny_latent_model(tmp_path_factory):
    """A tiny random SD-shaped model folder (16×16 images, VAE factor 2)."""
    from text23d.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_latent"), kind="latent")


@pytest.fixture(scope="session")
def tiny_pixel_model(tmp_path_factory):
    """A tiny random pixel-space model folder (3×16×16, no VAE)."""
    from text23d.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_pixel"), kind="pixel")


@pytest.fixture(scope="module")
def latent_prior(tiny_latent_model):
    from text23d.prior.loading import load_prior

    return load_prior(str(tiny_latent_model))


@pytest.fixture(scope="module")
def pixel_prior(tiny_pixel_model):
    from text23d.prior.loading import load_prior

    return load_prior(str(tiny_pixel_model))
