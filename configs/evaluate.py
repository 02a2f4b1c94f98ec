r"""python -m dmfnet_jax.main --config=configs/evaluate.py --workdir=runs/evaluate

Score fused images with the reference metrics (docs/model.md §7: EN SD SF AG MI SCD VIF
Qabf SSIM PSNR CC, all higher-is-better) against their sources, per image and per
task (mean and std), and mark the best method per metric.

Sources: `data.root` in the dataset layout `ROOT/<task>/test/{MRI,CT|PET|SPECT}/<id>.*`
(default: the shared Harvard data), `data.tasks`, `data.split` ("test", or
"dmfnet_side_by_side": the test ids listed under that key in ROOT/splits.json; any
other split folder name also works).

Methods: `evaluate.methods` maps a display name to what to score, one of
  "/path/to/folder"    fused images named like the sources, found as
                       <folder>/<task>/<id>.<ext> or, failing that, <folder>/<id>.<ext>
                       (png, jpg, jpeg, bmp, tif, tiff; the fuse job writes the first layout);
  "baseline:<name>"    a classical baseline computed on the fly, <name> one of
                       max, mean, laplacian, wavelet. It is scored on its grayscale
                       fused luma, as MODEL_CARD.md's max/mean rows are; append
                       ":colour" ("baseline:max:colour") to score the colourised image
                       the fuse job would write instead.
On the command line, add methods with
  --config.evaluate.extra_methods='DM-FNet=/path/to/fused,wav=baseline:wavelet'
(comma-separated name=value; they join `evaluate.methods`, replacing equal names).

Outputs in `evaluate.output_dir` (default WORKDIR/evaluation): per_image.{csv,md},
per_task.{csv,md} and evaluation.json (everything, including problems: fused
images missing, unreadable or of another size than their sources are logged,
listed there and left out of that method's mean; the count of evaluated pairs is
shown per method). With `evaluate.report`, also montages/<task>/<id>.png and one
self-contained report.html. `evaluate.num_workers`: threads (0 = all CPU cores).
`evaluate.compare_to=NAME`: also tabulate, per task and method, the metrics on which
it is at least as good as method NAME ("k of 11"), in per_task.md, the report and
evaluation.json["comparison"].

Presets: `configs/evaluate.py:dmfnet` scores the published DM-FNet outputs
(the published images; see README, Evaluation) with the max and mean baselines on the
`dmfnet_side_by_side` pairs, reproducing MODEL_CARD.md's DM-FNet rows, with every other
method compared to DM-FNet (`compare_to`).
"""

import ml_collections

from dmfnet_jax import config_defaults as defaults


def get_config(arg=None):
  preset = arg or "default"
  defaults.check_preset("evaluate.py", preset, ("default", "dmfnet"))
  config = ml_collections.ConfigDict()
  config.job = "evaluate"
  config.data = ml_collections.ConfigDict()
  config.data.root = defaults.harvard_root()
  config.data.tasks = defaults.TASKS  # a tuple: overridable from the command line
  config.data.split = "test"
  config.evaluate = ml_collections.ConfigDict()
  config.evaluate.methods = ml_collections.ConfigDict({
      "max": "baseline:max",
      "mean": "baseline:mean",
      "laplacian": "baseline:laplacian",
      "wavelet": "baseline:wavelet",
  })
  config.evaluate.extra_methods = ""
  config.evaluate.output_dir = ""  # default: WORKDIR/evaluation
  config.evaluate.report = True
  config.evaluate.report_max_pairs = 0  # montages in the HTML page; 0 = all
  config.evaluate.num_workers = 0  # 0 = all CPU cores
  config.evaluate.compare_to = ""  # a method name: count metrics at least as good as it
  if preset == "dmfnet":
    config.data.split = "dmfnet_side_by_side"
    config.evaluate.methods = ml_collections.ConfigDict({
        "DM-FNet": defaults.dmfnet_outputs_root(),
        "max": "baseline:max",
        "mean": "baseline:mean",
    })
    config.evaluate.compare_to = "DM-FNet"
  return config
