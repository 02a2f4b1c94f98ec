"""How well Stage I UNets reconstruct x0 from noisy Harvard test crops.

    python benchmarks/stage1_denoising.py --checkpoints=dmfnet_jax/weights/dmfnet_cpu_harvard,runs/stage1 \
        [--preset=cpu] [--timesteps=5,10,20,100,300,600,1000,1500]

Stage II reads the UNet's decoder features of images noised at timesteps 5, 10 and
20, so a UNet that cannot rebuild a barely noised image gives the fusion head
little to work with. Prints JSON: per checkpoint, the x0-prediction MSE (images in
[-1, 1], cosine schedule as in Stage I training) at each timestep and their mean,
on the central 128x128 crops of both images of every 15th test pair (the same
crops, noise and noise levels for every checkpoint). Data is found via
dmfnet_jax.paths (set DMFNET_SHARED to the shared folder).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dmfnet_jax import config_defaults, diffusion, imageio, paths  # noqa: E402
from dmfnet_jax.data import pairs as pairs_lib  # noqa: E402
from dmfnet_jax.data import pipeline  # noqa: E402
from dmfnet_jax.models import unet as unet_lib  # noqa: E402
from dmfnet_jax.inference import load_unet_params  # noqa: E402

CROP = 128


def test_crops(root: pathlib.Path) -> np.ndarray:
  scan = pairs_lib.find_split_pairs(root, config_defaults.TASKS, "test")
  crops = []
  for pair in scan.pairs[::15]:
    for path in (pair.path_a, pair.path_b):
      image = imageio.to_model_range(pipeline._integer_gray(imageio.read_image(path)))  # pylint: disable=protected-access
      top, left = (image.shape[0] - CROP) // 2, (image.shape[1] - CROP) // 2
      crops.append(image[top:top + CROP, left:left + CROP])
  return np.stack(crops)[..., None].astype(np.float32)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoints", required=True,
                      help="comma-separated Stage I/II workdirs, step folders or exported models")
  parser.add_argument("--preset", default="cpu", help="model preset (reference, tiny, cpu)")
  parser.add_argument("--timesteps", default="5,10,20,100,300,600,1000,1500")
  args = parser.parse_args()
  root = paths.harvard_root_or_exit()
  model_cfg = config_defaults.model_config(args.preset)
  diffusion_cfg = config_defaults.diffusion_config("cosine")  # Stage I's training schedule
  unet = unet_lib.unet_from_config(model_cfg)
  sqrt_acp_prev = np.asarray(diffusion.schedule_from_config(diffusion_cfg).sqrt_alphas_cumprod_prev)
  x0 = jnp.asarray(test_crops(root))
  timesteps = [int(t) for t in args.timesteps.split(",")]
  noise = jax.random.normal(jax.random.PRNGKey(0), (len(timesteps),) + x0.shape)
  predict = jax.jit(lambda params, x, g: unet.apply({"params": params}, x, g, train=False))
  results = {}
  for checkpoint in args.checkpoints.split(","):
    params = load_unet_params(checkpoint, model_cfg)
    mse = {}
    for i, t in enumerate(timesteps):
      g = jnp.full((x0.shape[0],), sqrt_acp_prev[t], jnp.float32)
      x_t = diffusion.q_sample(x0, g, noise[i])
      mse[t] = float(jnp.mean((predict(params, x_t, g) - x0) ** 2))
    results[checkpoint] = {"x0_mse": mse, "mean": float(np.mean(list(mse.values())))}
  print(json.dumps({"images": int(x0.shape[0]), "crop": CROP, "schedule": diffusion_cfg.schedule,
                    "checkpoints": results}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
