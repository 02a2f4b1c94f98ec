"""dmfnet-jax: DM-FNet multimodal medical image fusion in JAX/Flax.

    import dmfnet_jax
    fuser = dmfnet_jax.load()           # the shipped model; or load("path/to/checkpoint")
    fused = fuser.fuse(mri, pet)        # numpy arrays in, uint8 image out

See `dmfnet_jax.api` and README, "Python". Importing the package loads no framework;
`load` and `Fuser` import JAX when first used.
"""

__version__ = "0.1.0"
__all__ = ["Fuser", "load", "__version__"]


def __getattr__(name):
  if name in ("Fuser", "load"):
    from dmfnet_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'dmfnet_jax' has no attribute '{name}'")
