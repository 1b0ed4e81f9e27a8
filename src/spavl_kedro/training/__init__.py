"""Trainers: the methods table (`methods.py: METHODS`), each method's settings beside its trainer
(`dpo_config.py` / `dpo.py`, ...; the settings modules import no torch), what every recipe shares
(`recipe_config.py`, `recipe.py`), LoRA adapters (`adapters.py`) and the multi-process worker
(`train_worker.py`)."""
