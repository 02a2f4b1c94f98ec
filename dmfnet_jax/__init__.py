"""dmfnet-jax: DM-FNet multimodal medical image fusion in JAX/Flax.

    import dmfnet_jax
    fuser = dmfnet_jax.load()           # the shipped model; or load("path/to/checkpoint")
    fused = fuser.fuse(mri, pet)        # numpy arrays in, uint8 image out

See `dmfnet_jax.api` and README, "Python". Importing the package loads no framework;
`load` and `Fuser` import JAX when first used.
"""

import os

__version__ = "0.1.0"
__all__ = ["Fuser", "load", "__version__"]

# XLA:CPU settings the package makes (docs/performance.md): convolutions and matrix
# products through YNNPACK, about 10% faster than XLA's own kernels on x86 CPUs, with
# outputs equal to the reference within the parity tolerance (tests/test_package.py).
# A flag the user already set is kept; DMFNET_XLA_DEFAULTS=0 turns these off. They apply
# when JAX starts its CPU backend, so import dmfnet_jax before the first JAX computation.
XLA_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution",)


def _configure_xla() -> None:
  if os.environ.get("DMFNET_XLA_DEFAULTS", "1") == "0":
    return
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in XLA_DEFAULTS:
    if flag.split("=")[0] not in flags:
      flags = f"{flags} {flag}".strip()
  os.environ["XLA_FLAGS"] = flags


_configure_xla()


def __getattr__(name):
  if name in ("Fuser", "load"):
    from dmfnet_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'dmfnet_jax' has no attribute '{name}'")
