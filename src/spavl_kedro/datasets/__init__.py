from spavl_kedro.datasets.eval_sets import EvalSetDataset
from spavl_kedro.datasets.image_manifest import ImageManifestDataset
from spavl_kedro.datasets.model_directory import ModelDirectoryDataset
from spavl_kedro.datasets.optional import OptionalDataset
from spavl_kedro.datasets.spa_vl import SpaVLReleaseDataset
from spavl_kedro.datasets.spa_vl_rlhf import SpaVLRLHFDataset

__all__ = [
    "EvalSetDataset",
    "ImageManifestDataset",
    "ModelDirectoryDataset",
    "OptionalDataset",
    "SpaVLReleaseDataset",
    "SpaVLRLHFDataset",
]
