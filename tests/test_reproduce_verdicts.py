"""Issue 21, second pass: the default preset, both arithmetic prompt forms side by side, the
pruned Table 8 concept list and the LoRA verdicts of docs/applications.md."""

import argparse

import pandas as pd
import pytest

import mechcna
from mechcna.reproduce import ReproduceSettings


# ------------------------------------------------------------------------------ default preset
def test_default_preset_is_standard(monkeypatch, tmp_path):
    """The library call and both command lines run ``standard`` when no preset is named."""
    import mechcna.reproduce as rp
    from mechcna.cli import papers
    from mechcna.reproduce import command

    parser = argparse.ArgumentParser()
    papers._args(parser)
    assert papers._settings(parser.parse_args([])).preset == "standard"
    assert papers._settings(parser.parse_args(["--quick"])).preset == "quick"
    assert papers._settings(parser.parse_args(["--preset", "full"])).preset == "full"
    model = mechcna.load_model("mechcna/arith-small", device="cpu")
    chosen = []

    def stop(model, paper, *, settings, **kwargs):
        chosen.append(settings.preset)
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(command, "expected_times", lambda *a, **k: pd.DataFrame())
    monkeypatch.setattr(command, "reproduce", stop)
    for argv, preset in (([], "standard"), (["--quick"], "quick"), (["--preset", "full"], "full")):
        with pytest.raises(KeyboardInterrupt):
            command.main(["--model", "m", "--out", str(tmp_path / "o"), *argv])
        assert chosen.pop() == preset
    monkeypatch.setattr(rp, "run_stages", lambda stages, progress, lock: [])
    monkeypatch.setattr(rp, "expected_times", lambda *a, **k: pd.DataFrame())
    assert rp.reproduce(model, progress=False).settings["preset"] == "standard"
    assert rp.reproduce(model, quick=True, progress=False).settings["preset"] == "quick"
    assert ReproduceSettings.named("full").preset == "full"


# ------------------------------------------------------------------------------ labels
def test_attribution_rows_mark_their_sources(shipped_quick_attribution):
    """Every ATTR paper figure on a claim row is marked as a secondary source or as one
    prompt's notebook printout; Table 7 (query neurons) is labelled as the other experiment."""
    rep = shipped_quick_attribution
    rows = [c for c in rep.claim_list if c.paper == "attribution"]
    assert rows
    for c in rows:
        assert "(secondary source)" in c.paper_figure or (
            "notebook printout for one prompt" in c.paper_figure
        ), c.paper_figure
    printout = [c for c in rows if "20.37 of 32" in c.paper_figure]
    assert printout and all("one prompt" in c.paper_figure for c in printout)
    zeroing = rep.stage("zeroing").tables["zeroing"]
    t7 = [c for c in zeroing.columns if "Table 7" in c]
    assert t7 and all("QUERY neurons (other experiment)" in c for c in t7)
    layers = rep.stage("query").tables["query_layers"]
    cols = [c for c in layers.columns if "20.37" in str(layers[c].iloc[0])]
    assert cols and all("notebook printout, one prompt" in c for c in cols)


@pytest.fixture(scope="module")
def shipped_quick_attribution():
    from mechcna.reproduce import reproduce

    model = mechcna.load_model("mechcna/arith-small", device="cpu")
    return reproduce(model, "attribution", quick=True, progress=False)
