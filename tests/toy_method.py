"""A toy alignment method, as a newcomer would add one: this module, one row in `training.methods.METHODS`
and its recipe under `align.toy` (tests/test_pipelines.py registers and runs it).

"Best-of-chosen" distillation without gradients: the policy is returned unchanged, and the metrics say how
many pairs it saw and how often the chosen answer is the longer one (a sanity statistic of the data)."""

from __future__ import annotations

from pydantic import Field

from spavl_kedro.training.recipe_config import RecipeSettings


class ToySettings(RecipeSettings):
    run_name: str = Field("toy", description="name of the nested MLflow run")
    min_pairs: int = Field(1, ge=1, description="fail when the split has fewer pairs than this")


def train(vlm, records, settings: ToySettings, eval_records=None, reward_fn=None):
    if len(records) < settings.min_pairs:
        raise ValueError(f"toy: {len(records)} pairs, fewer than min_pairs {settings.min_pairs}")
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in records) / len(records)
    return vlm, {"pairs": len(records), "held_out": len(eval_records or []), "chosen_longer": longer}
