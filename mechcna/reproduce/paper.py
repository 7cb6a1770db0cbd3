"""The papers' published numbers that the reproduction puts beside ours.

Sources: docs/methods.md 4.6, 6, 7, 8.

Attribution paper (ATTR) numbers come from secondary sources (docs/methods.md 4.6);
arithmetic paper (ARITH) numbers from its full text. Keys are our table labels.
"""

LLAMA = "paper (Llama-7B)"
GPT2 = "paper (GPT-2)"

#: ATTR Table 2: MRR and probability (%) of the target after zeroing each method's top-10 FFN
#: neurons per sentence (lower is better); ``original`` is before any intervention.
METHOD_TABLE: dict[str, dict[str, tuple[float, float]]] = {
    GPT2: {
        "original": (0.361, 7.1),
        "log_prob_increase": (0.201, 3.4),
        "log_prob": (0.214, 3.6),
        "prob_increase": (0.219, 3.7),
        "norm": (0.363, 7.1),
        "coefficient": (0.439, 8.6),
        "rank": (0.306, 5.8),
        "coef_x_norm": (0.394, 8.1),
        "coef_x_rank": (0.232, 4.0),
    },
    LLAMA: {
        "original": (0.551, 21.5),
        "log_prob_increase": (0.312, 9.2),
        "log_prob": (0.339, 10.8),
        "prob_increase": (0.345, 10.0),
        "norm": (0.549, 21.3),
        "coefficient": (0.529, 22.9),
        "rank": (0.493, 18.1),
        "coef_x_norm": (0.523, 22.6),
        "coef_x_rank": (0.389, 13.0),
    },
}

#: ATTR Table 7: MRR / probability decrease (%) per knowledge type after zeroing the top-1000
#: *query* neurons (a different experiment from the value-neuron zeroing beside it; averages
#: 92/95 GPT-2 and 87/95 Llama; secondary source).
QUERY_TABLE7: dict[str, dict[str, tuple[float, float]]] = {
    GPT2: {
        "language": (91, 96), "capital": (98, 99), "country": (89, 94),
        "color": (95, 97), "number": (96, 96), "month": (83, 88), "all": (92, 95),
    },
    LLAMA: {
        "language": (78, 92), "capital": (84, 93), "country": (91, 98),
        "color": (85, 93), "number": (90, 96), "month": (94, 98), "all": (87, 95),
    },
}  # fmt: skip
#: ATTR appendix (project page, secondary source): MRR / probability decrease (%) after zeroing
#: the top-100 FFN + top-200 attention value neurons of each sentence, all types together.
VALUE_ZEROING: dict[str, tuple[float, float]] = {GPT2: (96.3, 99.2), LLAMA: (96.9, 99.6)}
#: Kept for callers of the old name: the per-type Table 7 numbers (query neurons).
TYPE_DECREASE = QUERY_TABLE7
#: Same-count random neurons (ATTR, secondary source): MRR / probability decrease (%).
RANDOM_DECREASE = (0.22, 0.14)

#: ATTR 5.2: mean layer of the top-30 attention value neurons (Llama 32 layers, GPT-2 36):
#: the notebooks' printout for ONE prompt, not a paper table.
ATTENTION_VALUE_MEAN_LAYER = {LLAMA: "20.37 of 32", GPT2: "21.74 of 36"}
#: ATTR 5.2: top query components of those neurons (label l = attention l, l + .5 = FFN l):
#: the notebooks' printout for ONE prompt.
ATTENTION_QUERY_TOP = {LLAMA: "19.5, 20.5, 15.5", GPT2: "0.5, 27.5, 2.5"}

#: ARITH Tables 24-27 (last prompt, Llama-7B): original accuracy (%) and the top head with its
#: accuracy after ablation, per (digits, operation) cell.
HEAD_CELLS: dict[str, tuple[float, str, float]] = {
    "1D+": (88.9, "17_22", 47.6), "2D+": (94.5, "17_22", 39.3), "3D+": (96.1, "17_22", 46.4),
    "1D-": (82.0, "17_22", 31.0), "2D-": (80.0, "16_1", 33.9), "3D-": (57.1, "16_1", 19.6),
    "1D*": (93.0, "3_5", 85.4), "2D*": (56.9, "15_9", 49.3), "3D*": (32.8, "3_5", 25.9),
    "1D/": (78.9, "14_19", 35.6), "2D/": (48.6, "14_19", 13.7), "3D/": (19.0, "14_19", 9.67),
}  # fmt: skip
#: ARITH Table 2: relative accuracy decrease (%) of the top head per operation and digits.
TOP_HEAD_DECREASE: dict[str, dict[int, float]] = {
    "+": {1: 46.5, 2: 58.4, 3: 52.5},
    "-": {1: 62.2, 2: 52.6, 3: 56.9},
    "*": {1: 6.8, 2: 11.2, 3: 8.1},
    "/": {1: 54.9, 2: 71.8, 3: 53.2},
}
#: ARITH Table 3: top head's decrease (%) on memorize / change-one cases per operation.
KIND_DECREASE: dict[str, tuple[float, float]] = {
    "+": (59.2, 57.1), "-": (49.8, 65.5), "*": (11.6, 11.3), "/": (63.6, 75.2),
}  # fmt: skip
#: ARITH Table 1: 2D overall accuracy 74.8 -> 53.4 with 17_22 ablated; 976 of 1024 heads change
#: it by only 0.01-2 points.
TABLE1_ALL = (74.8, "17_22", 53.4)
#: ARITH Table 1 per operation (2D, the four templates pooled): ori -> with 17_22 ablated.
TABLE1_17_22: dict[str, tuple[float, float]] = {
    "+": (96.8, 42.9), "-": (94.4, 72.3), "*": (56.6, 50.5), "/": (51.4, 48.2),
}  # fmt: skip
QUIET_HEADS = (976, 1024)

#: ARITH Table 4 ("3+5=", head 17_22): the top CNA neuron and its importance in M and M'.
TOP_CNA = ("28_3696", 0.6964, 0.82, 0.13)
#: The K columns of the top-K tables (Tables 5-6 and 15-16; the paper's top99 written top100).
TOP_KS = ("top100", "top50", "top30", "top20", "top10")
#: ARITH Tables 5 / 6 (Llama head 17_22, 1D +/-) and appendix B Tables 15 / 16 (division head
#: 14_19, 1D /), per K: accuracy decrease (%) with the top-K CNA neurons masked ("mask") or
#: only they kept ("keep"), coefficient decrease (%) of the top neurons ("coef"), and that after
#: zeroing the lowest top neuron ("lowest").
_TOP_K_ROWS = {
    ("17_22", "mask"): (100.0, 96.0, 89.5, 86.8, 68.4),
    ("17_22", "keep"): (3.9, 7.8, 13.2, 18.4, 38.2),
    ("17_22", "coef"): (49.1, 60.4, 67.2, 72.7, 77.1),
    ("17_22", "lowest"): (15.8, 14.8, 12.5, 9.5, 4.4),
    ("14_19", "mask"): (84.6, 82.1, 74.4, 66.7, 51.3),
    ("14_19", "keep"): (48.7, 51.3, 53.9, 53.9, 64.2),
    ("14_19", "coef"): (50.0, 61.0, 67.0, 70.0, 73.0),
    ("14_19", "lowest"): (1.3, 0.9, 3.2, 4.9, 7.0),
}


def _top_k(head: str, row: str) -> dict[str, float]:
    return dict(zip(TOP_KS, _TOP_K_ROWS[head, row], strict=True))


#: ARITH Table 5 (17_22): mask / keep accuracy and coefficient decrease (%) per K.
MASK_KEEP = {row: _top_k("17_22", row) for row in ("mask", "keep", "coef")}
#: ARITH Table 6: coefficient decrease (%) of the top neurons after zeroing the lowest one.
LOWEST_NEURON = _top_k("17_22", "lowest")
#: ARITH Tables 8 (17_22, 1D +/-) and 17 (14_19, 1D /): M -> neurons selected, accuracy
#: decrease (%) with 17_22's sets, with 14_19's; random sets: 2.6% (1,953 neurons, Table 8) and
#: 5.1% (10,426 neurons, Table 17).
_ZERO_SHOT_ROWS = ((0, 51980, 98.7, 97.5), (1, 10426, 68.4, 82.1), (2, 1953, 53.9, 30.8),
                   (3, 510, 43.4, 25.7))  # fmt: skip
ZERO_SHOT: dict[int, tuple[int, float]] = {m: (n, d) for m, n, d, _ in _ZERO_SHOT_ROWS}
ZERO_SHOT_RANDOM = 2.6
#: ARITH Table 7: tokens of the operand "3" through attention layer 15.
OPERAND_TOKENS = {"3": "three, Three, RGB, triple, 3, triangle", "5": "Fif, XV, engo, vos, fif"}

#: ARITH 4.2 step 3 ("3+5=", Llama-7B): the prediction-enhancing graph's large value-key
#: products (no number given in the paper or the notebook).
PE_EDGES = "19_5769 -> 25_7164, 19_5769 -> 28_3696, 25_7164 -> 28_3696 (root 19_5769)"
#: ARITH appendix B (division head 14_19, 1D /): Table 15 mask / keep / coef decrease (%).
DIV_MASK_KEEP = {row: _top_k("14_19", row) for row in ("mask", "keep", "coef")}
#: ARITH Table 16: coefficient decrease (%) after zeroing the lowest top neuron (14_19, 1D /).
DIV_LOWEST_NEURON = _top_k("14_19", "lowest")
#: ARITH Table 17 (14_19, 1D /): M -> (neurons, accuracy decrease %); random 10,426: 5.1%.
DIV_ZERO_SHOT: dict[int, tuple[int, float]] = {m: (n, d) for m, n, _, d in _ZERO_SHOT_ROWS}
DIV_ZERO_SHOT_RANDOM = 5.1
#: ARITH Table 14: the four prompt templates (template 4 is the one of Tables 24-27).
TEMPLATES = {1: "The sum of n1 and n2 is", 2: "Q: What is n1 plus n2? A:", 3: "n1 plus n2 is",
             4: "n1+n2="}  # fmt: skip
# ---------------------------------------------------------------- ATTR items of issue 22
#: ATTR Table 7 random baseline: 1000 random FFN neurons zeroed, MRR / probability decrease (%)
#: (secondary source).
QUERY_RANDOM_DECREASE = (0.8, 1.1)
#: ATTR head intervention (GPT-2, secondary source): zeroing the top-1% heads of a knowledge
#: type lowers MRR / probability by 44.5 / 53.3% on sentences of that type and by 7.1 / 9.5%
#: on sentences of the other types.
HEAD_SAME_TYPE = {GPT2: (44.5, 53.3)}
HEAD_OTHER_TYPE = {GPT2: (7.1, 9.5)}
#: ATTR 5.5 (secondary source): % of top neurons shared by more than half the sentences of a
#: type, (value, query).
SHARED_NEURONS = {GPT2: (27.6, 15.7), LLAMA: (14.1, 5.2)}
#: ATTR Table 9 / knowledge notebook cell 19: a hidden-interpretable query neuron made readable
#: through the head of the attention neuron it feeds (the Llama list is the BOTTOM of the
#: transformed vector, quoted by the project page as its top tokens).
QUERY_NEURON_TOKENS = {
    LLAMA: "5_5005 via head 15_15: basketball, Basketball, NBA, Jazz, asketball (bottom)",
    GPT2: "0_1984 via head 21_19: basketball, Basketball, NBA, Celtics (top)",
}
