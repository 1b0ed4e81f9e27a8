from spavl_kedro.datasets.image_manifest import ImageManifestDataset
from spavl_kedro.datasets.model_directory import ModelDirectoryDataset

__all__ = ["ImageManifestDataset", "ModelDirectoryDataset"]
