"""Run by tests in their own process (other XLA flags or device counts): fuses phantom
pairs with a checkpoint through the engine and saves the float outputs.

  python tests/fuse_probe.py CHECKPOINT OUT.npy COUNT SIZE
"""

import json
import sys

import numpy as np

import dmfnet_jax
from dmfnet_jax.api import _content_key, prepare
from dmfnet_jax.data import phantoms


def main(checkpoint: str, out: str, count: int, size: int) -> None:
  fuser = dmfnet_jax.load(checkpoint, batch_size=count)
  pairs = [phantoms.phantom_pair(i, size, "MRI-PET", seed=5) for i in range(count)]
  prepared = [(prepare(a), prepare(b)) for a, b in pairs]
  keys = [_content_key(fuser._root, a, b) for a, b in prepared]  # pylint: disable=protected-access
  fused = fuser.model.fuse_images([a.model_range for a, _ in prepared],
                                  [b.model_range for _, b in prepared], keys, count)
  np.save(out, np.stack(fused))
  print(json.dumps({"devices": len(fuser.model.devices)}))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
