"""The PyTorch timing baseline (benchmarks/torch_dmfnet.py) reproduces the reference."""

import importlib.util

import numpy as np
import pytest

from conftest import REPO_ROOT

torch = pytest.importorskip("torch", reason="PyTorch is not installed (only the torch "
                            "timing baseline needs it)")

TAGS = [f"{src}_t{t}" for t in (5, 10, 20) for src in ("MRI", "Other")]
TOL = 1e-4


@pytest.fixture(scope="module")
def tdm():
  spec = importlib.util.spec_from_file_location(
      "torch_dmfnet", REPO_ROOT / "benchmarks" / "torch_dmfnet.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  # One thread: with 2 intra-op threads on a busy 2-core machine, OpenMP barriers make
  # these small passes ~100x slower. Restored afterwards (the setting is process-wide).
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield module
  torch.set_num_threads(threads)


def _load(path):
  state = torch.load(path, map_location="cpu", weights_only=True)
  prefix = "denoise_fn."
  if any(k.startswith(prefix) for k in state):  # diffusion wrapper: drop schedule buffers
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  return state


def _models(tdm, root, unet_file, head_file, **unet_kwargs):
  unet = tdm.UNet(**unet_kwargs).eval()
  unet.load_state_dict(_load(root / unet_file), strict=True)
  head = tdm.FusionHead.for_unet(unet).eval()
  head.load_state_dict(_load(root / head_file), strict=True)
  return unet, head


def _noisy(vectors):
  return {(src, t): (torch.from_numpy(vectors[f"{name}_t{t}_x_noisy"]),
                     torch.from_numpy(vectors[f"{name}_t{t}_noise_level"]))
          for src, name in enumerate(("MRI", "Other")) for t in (5, 10, 20)}


def _max_err(got, want):
  return float(np.max(np.abs(got.detach().numpy() - want)))


def test_tiny_unet_features_and_head(tdm, parity_root):
  unet, head = _models(tdm, parity_root, "tiny_stage1_unet.pth", "tiny_stage2_head.pth",
                       inner_channel=32, norm_groups=8, image_size=64)
  vectors = np.load(parity_root / "tiny_vectors.npz")
  with torch.no_grad():
    for tag in TAGS:
      enc, dec, out = unet(torch.from_numpy(vectors[f"{tag}_x_noisy"]),
                           torch.from_numpy(vectors[f"{tag}_noise_level"]), feat_need=True)
      assert len(enc) == len(dec) == 15
      assert _max_err(out, vectors[f"{tag}_unet_out"]) < TOL, tag
      for j in range(15):
        assert _max_err(enc[j], vectors[f"{tag}_enc_{j}"]) < TOL, (tag, "enc", j)
        assert _max_err(dec[j], vectors[f"{tag}_dec_{j}"]) < TOL, (tag, "dec", j)
  assert _max_err(tdm.fuse_noisy(unet, head, _noisy(vectors)), vectors["fused"]) < TOL


def test_published_checkpoints_end_to_end(tdm, parity_root):
  root = parity_root / "published"
  unet, head = _models(tdm, root, "published_stage1_gen.pth", "published_stage2_head.pth",
                       inner_channel=32, norm_groups=32, image_size=160)
  assert all(m.attn is None for m in list(unet.downs) + list(unet.ups)
             if isinstance(m, tdm.ResnetBlocWithAttn))  # middle-only attention
  vectors = np.load(root / "published_vectors.npz")
  assert _max_err(tdm.fuse_noisy(unet, head, _noisy(vectors)), vectors["fused"]) < TOL


def test_fuse_pair_runs_the_test_script_path(tdm):
  torch.manual_seed(0)
  unet, head = tdm.build(16, 4, 64)
  a = torch.rand(1, 1, 64, 64) * 2 - 1
  fused = tdm.fuse_pair(unet, head, a, -a, generator=torch.Generator().manual_seed(1))
  assert fused.shape == (1, 1, 64, 64) and bool(torch.isfinite(fused).all())
  assert not fused.requires_grad


def test_reference_unet_parameter_count(tdm):
  with torch.device("meta"):  # shapes only, no allocation
    unet = tdm.UNet(**tdm.PRESETS["reference"])
  assert sum(p.numel() for p in unet.parameters()) == 20_670_081
  with torch.device("meta"):
    shipped = tdm.UNet(**tdm.PRESETS["shipped"])
  assert sum(p.numel() for p in shipped.parameters()) == 1_382_753  # C=32, 16x16 attention (as the JAX UNet)
