from functools import partial

from kedro.pipeline import Node, Pipeline

from spavl_kedro.training.methods import METHODS

from .nodes import prepare_bases, prepare_policy, train_method

# What each kind of record is built from (training.methods.RECORDS), as train_method's keyword -> dataset:
# kedro-viz then shows which data made which model.
# Every method reads its pairs from the release datasets on disk (this project's export, or the official
# release: align.train_source), so one train node runs alone (`--nodes train_sft`).
PAIRS = {"ours": "spa_vl_release", "official": "spa_vl_official"}
DATA = {
    "pairs": PAIRS,
    "targets": {**PAIRS, "mis_train": "mis_train", "images": "images", "seed_corpus": "seed_corpus"},
    "prompts": PAIRS,
}
# Online RL's reward: the reward models (one dataset, so a reward model trained in this run comes first)
# and the primary judge.
# Written by earlier pipelines, needed only by some routes (sft on chain-of-thought; a tiny judge).
# policy_bases: written by prepare_bases; a method that trains from `align.policy` alone needs none.
TAKES_MISSING = frozenset({"mis_train", "images", "seed_corpus", "judge_models", "policy_bases"})
REWARD = {
    "reward_models": "aligned_reward",
    "credentials": "api_credentials",
    "judge_models": "judge_models",
    "judge_params": "params:judge",
}


def _trainer(method: str) -> partial:
    node_func = partial(train_method, method)
    # kedro-viz shows the function's name and docstring; no __wrapped__, or Kedro's check of typed params
    # would read train_method's signature, `method` included, instead of the partial's
    node_func.__name__, node_func.__doc__ = f"train_{method}", train_method.__doc__
    node_func.takes_missing = TAKES_MISSING  # the official route: train_method says what it needs
    return node_func


def create_pipeline(**kwargs) -> Pipeline:
    train_nodes = [
        Node(
            _trainer(name),
            {
                "policy_base": "policy_base",
                "policy_bases": "policy_bases",
                "params": "params:align",
                **DATA[row.records],
                **(REWARD if row.rewarded else {}),
            },
            [f"aligned_{name}", f"align_summary_{name}", f"align_run_params_{name}"],
            name=f"train_{name}",
        )
        for name, row in METHODS.items()
    ]
    return Pipeline(
        [
            Node(
                prepare_policy,
                ["seed_corpus", "tiny_foundation", "params:align", "params:tiny"],
                "policy_base",
                name="prepare_policy",
            ),
            Node(
                prepare_bases,
                ["seed_corpus", "tiny_foundation", "params:align", "params:tiny"],
                "policy_bases",
                name="prepare_bases",
            ),
            *train_nodes,
        ]
    )
