"""Data layer: image pairs on disk, synthetic phantoms and grain training pipelines."""

from dmfnet_jax.data.pairs import (
    TASKS,
    ImagePair,
    LoadedPair,
    PairScan,
    find_dataset_pairs,
    find_folder_pairs,
    load_pair,
    modality_of,
    pairs_from_list,
)
from dmfnet_jax.data.phantoms import phantom_pair, write_phantom_dataset
