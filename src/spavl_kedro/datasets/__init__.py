from spavl_kedro.datasets.model_directory import ModelDirectoryDataset

__all__ = ["ModelDirectoryDataset"]
