from spavl_kedro.sweep import commands, main


def test_grid_expands_to_one_named_kedro_run_per_combination():
    runs = commands(["align.method=dpo,sft", "split.subset.max_pairs=100,1000"], "split,align,evaluate", "paper")
    assert len(runs) == 4
    params = [r[r.index("--params") + 1] for r in runs]
    assert params[0] == "align.method=dpo,split.subset.max_pairs=100,align.name=methoddpo-maxpairs100"
    assert len({p.rsplit("align.name=", 1)[1] for p in params}) == 4  # every run keeps its own model
    assert all(r[-2:] == ["--env", "paper"] for r in runs)


def test_dry_run_prints_and_runs_nothing(capsys):
    assert main(["--grid", "align.dpo.beta=0.05,0.1", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "align.dpo.beta=0.05" in out[0] and out[1].startswith("[2/2]")
