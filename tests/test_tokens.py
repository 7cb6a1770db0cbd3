"""A neuron's top tokens are the same on every page: sign-aware, one function (issue 23)."""

from typing import Any

import pandas as pd
import pytest
import torch

import mechcna
from mechcna.analyses.attribution import neuron_importance
from mechcna.analyses.comparative import cna_table, compare_inputs, compare_neurons
from mechcna.analyses.plotting import neuron_layer_counts
from mechcna.analyses.tokens import frame_tokens, neuron_tokens, prompt_coefficients, result_tokens
from mechcna.cli import main
from mechcna.interventions.edits import HeadAblation

PROMPT, NEURON = "3+5=", (3, 266)
LABEL = "3_266"


@pytest.fixture(scope="module")
def shipped():
    return mechcna.load_model("mechcna/arith-small", device="cpu")


def reference_tokens(model, layer: int, neuron: int, coefficient: float, k: int = 10) -> str:
    """Slow and obvious: project ``m * W_out[k]`` through the RMSNorm weight and ``W_U``."""
    assert model.cfg.normalization_type == "RMS"
    with torch.no_grad():
        vector = coefficient * model.W_out[layer, neuron].double()
        logits = (vector * model.ln_final.w.double()) @ model.W_U.double()
    ids = logits.topk(k).indices.tolist()
    return ", ".join(model.to_single_str_token(i) for i in ids)


def test_negative_coefficient_lists_the_promoted_not_the_suppressed_tokens(shipped):
    res = neuron_importance(shipped, [PROMPT])
    m = float(res.extras["coefficient"][0][NEURON])
    assert m < 0  # the case of the issue: 3_266 on 3+5= has coefficient about -3.29
    want = reference_tokens(shipped, *NEURON, m)
    assert want != reference_tokens(shipped, *NEURON, 1.0)
    assert want.split(", ")[:3] == ["9", "8", "6"]
    assert neuron_tokens(shipped, [LABEL], [m]) == {LABEL: want}
    assert result_tokens(shipped, res, [LABEL], 0) == {LABEL: want}
    assert prompt_coefficients(shipped, PROMPT, [LABEL]) == pytest.approx([m], rel=1e-5)
    assert (
        frame_tokens(shipped, res.top(5, prompt=0)).set_index("label").loc[LABEL, "top_tokens"]
        == want
    )
    # no coefficient column: read at the prompt
    bare = pd.DataFrame({"layer": [3], "neuron": [266]})
    assert frame_tokens(shipped, bare, prompt=PROMPT)["top_tokens"].tolist() == [want]
    counts: Any = neuron_layer_counts(res, k=20, prompt=0, model=shipped)
    hover = counts.data[0].hovertext[3]
    assert f"{LABEL}: " in hover and want in hover
    cna = compare_neurons(shipped, [PROMPT], HeadAblation([(2, 0)]))
    table = cna_table(shipped, cna, prompt=0, k=20).set_index("neuron")
    assert table.loc[LABEL, "top_tokens"] == want
    assert result_tokens(shipped, cna, [LABEL], 0) == {LABEL: want}
    pair = compare_inputs(shipped, [PROMPT], ["2+4="], ["8"])
    assert result_tokens(shipped, pair, [LABEL], 0) == {LABEL: want}


def test_every_cli_page_shows_the_same_tokens(shipped, tmp_path, capsys):
    coef = neuron_importance(shipped, [PROMPT]).extras["coefficient"][0]
    pages = {
        "attribute": (["--level", "ffn", "--top", "5"], "table-*-ffn-0.csv"),
        "cna": (["--head", "2.0", "--top", "5"], "table-*-cna-0.csv"),
        "query-neurons": (["--k", "30", "--top", "3"], "table-*.csv"),
    }
    seen = {}
    for name, (args, table) in pages.items():
        out = tmp_path / name
        assert main([name, "--prompt", PROMPT, *args, "--quiet", "--out", str(out)]) == 0
        capsys.readouterr()
        (path,) = out.glob(table)
        frame = pd.read_csv(path)
        if "layer" not in frame.columns:  # the CNA table names neurons by label only
            frame[["layer", "neuron"]] = frame["neuron"].str.split("_", expand=True).astype(int)
        for layer, neuron, tokens in zip(frame["layer"], frame["neuron"], frame["top_tokens"]):
            want = reference_tokens(shipped, layer, neuron, float(coef[layer, neuron]))
            assert tokens == want, (name, layer, neuron)
            seen.setdefault(f"{layer}_{neuron}", set()).add(name)
    assert {"attribute", "cna"} <= seen[LABEL]


def test_layer_tables_name_components_and_input_comparisons_name_inputs():
    from tests.helpers import PROMPTS, build

    model = build("gpt2", dtype=torch.float64)
    layers = mechcna.layer_importance(model, PROMPTS)
    top = layers.top(4, prompt=0)
    assert set(top["component"]) <= {"attention", "FFN"}
    for layer, component, score, label in zip(
        top["layer"], top["component"], top["score"], top["label"], strict=True
    ):
        code = ("attention", "FFN").index(component)
        assert score == pytest.approx(float(layers.scores[0, layer, code]))
        assert label == f"{layer}_{component}"
    assert set(layers.to_frame()["component"]) == {"attention", "FFN"}
    pair = compare_inputs(model, PROMPTS[:1], PROMPTS[1:2], None)
    fig: Any = pair.plot(prompt=0, k=5, names=("'a'", "'b'"))
    assert [t.name for t in fig.data] == [
        "importance in 'a'", "importance in 'b'", "CNA delta ('a' - 'b')",
    ]  # fmt: skip
