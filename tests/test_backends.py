"""The core suite on both backends: HookedTransformer and TransformerBridge give equal results.

Tiny GPT-2-like and Llama-like (grouped-query attention) Hugging Face checkpoints are built
offline with seeded weights and loaded with ``load_model(..., backend=...)``. Under
TransformerLens 3.x both backends run here and must agree within 1e-5 (fp32); setting
``MECHCNA_BACKEND_GOLDEN`` writes the HookedTransformer results to that file. Under
TransformerLens 4 (``make test-tl4``) only the bridge exists and its results are compared
with that file, written by the 3.x environment from the same checkpoints.
"""

import os
import warnings
from pathlib import Path

import pytest
import torch

import mechcna
from mechcna import (
    HeadAblation,
    NeuronEdit,
    Patch,
    check_model,
    head_sweep,
    intervene,
    load_model,
    neuron_importance,
)
from mechcna.analyses.comparative import compare_neurons
from mechcna.errors import UnsupportedArchitectureError, UserHookWarning
from mechcna.models.backend import backend_of, hooked_available
from mechcna.tasks.arithmetic import arithmetic_dataset
from tests import reference
from tests.helpers import PROMPTS, tokenizer

TOL = 1e-5
GOLDEN = os.environ.get("MECHCNA_BACKEND_GOLDEN")


def _fill(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights by parameter name: the same checkpoint in every environment."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)
            is_norm = name.endswith("weight") and p.ndim == 1
            p.copy_(1 + 0.2 * noise if is_norm else 0.2 * noise)


def build_checkpoint(kind: str, path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    common = {"vocab_size": len(tok), "bos_token_id": 1, "eos_token_id": 2}
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, n_positions=32, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=32,
            tie_word_embeddings=False,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    _fill(model, seed=0 if kind == "gpt2" else 1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    kind = request.param
    return kind, build_checkpoint(kind, tmp_path_factory.mktemp(kind) / "tiny")


def _hook_count(model) -> int:
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())


def core_results(model) -> dict[str, torch.Tensor]:
    """Every core analysis on ``model``; each result as a tensor."""
    return {**_core(model), **_further(model)}


def _further(model) -> dict[str, torch.Tensor]:
    """The other analyses: attribution at every level, query neurons and layers, transfer
    through attention, the zero-shot search, accuracy."""
    data = arithmetic_dataset("+", 1, templates=4, n_pairs=6, tokenizer=model)
    transform = mechcna.transform_through_attention(model, (0, 3), [(1, None, 0)], PROMPTS[1])
    return {
        "layer_importance": mechcna.layer_importance(model, PROMPTS).scores,
        "head_importance": mechcna.head_importance(model, PROMPTS, by_position=True).scores,
        "attention_neuron_importance": mechcna.attention_neuron_importance(model, PROMPTS).scores,
        "query_neurons": mechcna.query_neurons(model, PROMPTS, k=5).scores,
        "ffn_query_layers": mechcna.ffn_query_layers(model, PROMPTS, k=5).scores,
        "source_position_scores": mechcna.source_position_scores(
            model, PROMPTS[1], 1, (1, 3)
        ).scores,
        "transform_through_attention": transform.hops,
        "hidden_interpretable_neurons": mechcna.hidden_interpretable_neurons(
            model, top=5
        ).counts.double(),
        "evaluate_accuracy_logprob": mechcna.evaluate_accuracy(model, data, progress=False).logprob,
    }


def _core(model) -> dict[str, torch.Tensor]:
    imp = neuron_importance(model, PROMPTS)
    cna = compare_neurons(model, PROMPTS, HeadAblation([(1, 0)]))
    sweep = head_sweep(model, PROMPTS, progress=False, heads_per_pass=3)
    edits = (NeuronEdit([(0, 1), (1, 3)]), HeadAblation([(0, 2)]))
    tokens = model.to_tokens(PROMPTS[1])
    with intervene(model, *edits), torch.no_grad():
        edited = model(tokens)
    report = check_model(model)
    return {
        "neuron_importance": imp.scores,
        "cna_delta": cna.delta,
        "sweep_logprob": sweep.logprob,
        "sweep_base_logprob": sweep.base_logprob,
        "sweep_prediction": sweep.prediction.double(),
        "intervened_logits": edited,
        "check_model": torch.tensor([report.residual, report.heads, report.neurons]),
    }


def _weights_key(path: Path) -> float:
    from safetensors.torch import load_file

    return float(
        sum(v.double().abs().sum() for v in load_file(path / "model.safetensors").values())
    )


def _assert_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in got:
        if name == "check_model":  # errors of an identity: both tiny, not equal
            assert float(got[name].max()) < 1e-5 and float(want[name].max()) < 1e-5
            continue
        diff = float((got[name].double() - want[name].double()).abs().max())
        assert diff <= TOL, f"{what}: {name} differs by {diff:.2e}"


def test_bridge_core_suite(checkpoint):
    """On a bridge: attribution equals the literal reference, CNA of the model with itself
    is zero, hooks are gone after intervening (also when the body raises), check_model passes."""
    _, path = checkpoint
    model = load_model(path, device="cpu", backend="bridge")
    assert backend_of(model) == "bridge"
    with warnings.catch_warnings():  # the bridge's own hooks are not the user's
        warnings.simplefilter("error", UserHookWarning)
        res = neuron_importance(model, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        ref, w = reference.literal_ffn_scores(model, model.to_tokens(prompt)[0])
        assert int(res.target_ids[i]) == w
        torch.testing.assert_close(res.scores[i].to(ref), ref, atol=1e-4, rtol=0)
    twin = load_model(path, device="cpu", backend="bridge")  # M' = M itself is refused
    assert float(compare_neurons(model, PROMPTS, twin).delta.abs().max()) == 0.0
    with pytest.raises(RuntimeError), intervene(model, NeuronEdit([(0, 1)])):
        assert _hook_count(model) > 0
        raise RuntimeError("body fails")
    assert _hook_count(model) == 0
    check_model(model)
    with pytest.raises(UnsupportedArchitectureError, match="resid_mid"):
        Patch("blocks.0.hook_resid_mid", torch.zeros(1, 1, 32)).fwd_hooks(model)
    model.hook_dict["blocks.0.hook_resid_pre"].add_hook(lambda x, hook: x)
    with pytest.warns(UserHookWarning, match="blocks.0.hook_resid_pre"):
        neuron_importance(model, PROMPTS[:1])
    model.reset_hooks()


@pytest.mark.skipif(not hooked_available(), reason="TransformerLens 4: compared with GOLDEN")
def test_hooked_and_bridge_agree(checkpoint):
    kind, path = checkpoint
    hooked = core_results(load_model(path, device="cpu", backend="hooked"))
    bridge = load_model(path, device="cpu", backend="bridge")
    _assert_equal(core_results(bridge), hooked, f"{kind} bridge vs hooked")
    assert _hook_count(bridge) == 0
    if GOLDEN:
        golden = Path(GOLDEN)
        stored = torch.load(golden) if golden.is_file() else {}
        stored[kind] = {"weights": _weights_key(path), "results": hooked}
        torch.save(stored, golden)


@pytest.mark.skipif(hooked_available(), reason="TransformerLens 3.x: compared directly")
def test_bridge_equals_hooked_golden(checkpoint):
    kind, path = checkpoint
    assert GOLDEN and Path(GOLDEN).is_file(), (
        "set MECHCNA_BACKEND_GOLDEN to the file the TransformerLens 3.x run writes "
        "(make test-tl4 does)"
    )
    stored = torch.load(GOLDEN)[kind]
    assert stored["weights"] == pytest.approx(_weights_key(path), rel=1e-12)
    bridge = load_model(path, device="cpu", backend="bridge")
    _assert_equal(core_results(bridge), stored["results"], f"{kind} TL4 bridge vs TL3 hooked")


def test_shipped_model_on_bridge():
    """The shipped mechcna checkpoint converts to an equivalent Hugging Face Llama model."""
    bridge = load_model("mechcna/arith-small", device="cpu", backend="bridge")
    check_model(bridge)
    from mechcna.applications.lora import attach_lora

    with pytest.raises(UnsupportedArchitectureError, match="LoRA"):
        attach_lora(bridge, [0])
    if hooked_available():
        hooked = load_model("mechcna/arith-small", device="cpu")
        tokens = hooked.to_tokens(["3+5=", "12+7="])
        with torch.no_grad():
            diff = (hooked(tokens).log_softmax(-1) - bridge(tokens).log_softmax(-1)).abs().max()
        assert float(diff) < TOL


ALL_STEPS = mechcna.WeightProcessing(
    fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
)


def test_processed_bridge_exact_or_refused(checkpoint):
    """A bridge with processed weights: the invariant analyses equal the unprocessed bridge's
    (and the unprocessed HookedTransformer's), the others refuse it, also when mechcna did
    not load it (the processing is read from the bridge itself)."""
    from tests.test_processing import REFUSED

    _, path = checkpoint
    plain = load_model(path, device="cpu", backend="bridge")
    processed = load_model(path, device="cpu", backend="bridge", processing=ALL_STEPS)
    assert mechcna.get_processing(processed).fold_ln
    for fn in (neuron_importance, mechcna.layer_importance):
        a, b = fn(plain, PROMPTS).scores, fn(processed, PROMPTS).scores
        assert float((a - b).abs().max()) <= TOL, fn.__name__
    for name in sorted(REFUSED):
        REFUSED[name](plain)  # runs unprocessed
        with pytest.raises(mechcna.WeightProcessingError, match="no_processing=True"):
            REFUSED[name](processed)
            pytest.fail(f"{name} did not refuse a processed bridge")
    object.__delattr__(processed, "_mechcna_processing")
    assert mechcna.get_processing(processed).fold_ln  # inferred from the bridge alone
    with pytest.raises(mechcna.WeightProcessingError, match="fold_ln"):
        mechcna.query_neurons(processed, PROMPTS, k=5)


def test_weight_edits_on_bridges_equal_hooks(checkpoint):
    """apply_to_weights on a bridge (GPT-2's cannot be deep-copied: it is re-wrapped) equals
    the same edits by hooks, and leaves the original untouched."""
    from mechcna import apply_to_weights

    kind, path = checkpoint
    model = load_model(path, device="cpu", backend="bridge")
    tokens = model.to_tokens(PROMPTS[1])
    edits = [NeuronEdit([(0, 1), (1, 3)]), HeadAblation([(1, 0)])]
    if kind == "gpt2":  # mean ablation moves a constant into b_O: needs a bias
        edits.append(HeadAblation.mean_over(model, [(0, 2)], model.to_tokens(PROMPTS[0])))
    with torch.no_grad():
        before = model(tokens)
        edited = apply_to_weights(model, *edits)
        assert backend_of(edited) == "bridge"
        assert edited.cfg.default_prepend_bos == model.cfg.default_prepend_bos
        by_weights = edited(tokens)
        with intervene(model, *edits):
            by_hooks = model(tokens)
        assert float((by_weights - by_hooks).abs().max()) <= TOL
        assert float((by_weights - before).abs().max()) > 1e-3  # the edits change something
        torch.testing.assert_close(model(tokens), before, atol=0, rtol=0)
    processed = load_model(path, device="cpu", backend="bridge", processing=ALL_STEPS)
    edit = NeuronEdit([(0, 1), (1, 3)])
    with torch.no_grad(), intervene(processed, edit):
        by_hooks = processed(tokens)
    if kind == "llama" and hooked_available():
        # TL 3.9: a processed Llama bridge's weight properties are copies its forward pass
        # does not read (TL 4.3 writes through): refused, never silently unedited
        with pytest.raises(UnsupportedArchitectureError, match="do not reach"):
            apply_to_weights(processed, edit)
        return
    with torch.no_grad():
        by_weights = apply_to_weights(processed, edit)(tokens)
    assert float((by_weights - by_hooks).abs().max()) <= TOL


def test_gguf_file_on_bridge(tmp_path, monkeypatch):
    """A (tiny, Q8_0) GGUF file loads as a bridge offline: equal to the transformers model,
    with its dequantisation recorded."""
    from mechcna import get_provenance
    from tests.test_gguf import _tiny_llama, assert_matches_transformers, write_gguf

    monkeypatch.setenv("MECHCNA_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "tiny").mkdir()
    path = write_gguf(tmp_path / "tiny" / "tiny.Q8_0.gguf", _tiny_llama())
    bridge = load_model(path, device="cpu", backend="bridge")
    assert backend_of(bridge) == "bridge"
    assert_matches_transformers(bridge, path)
    source = get_provenance(bridge)
    assert source is not None
    assert (source.format, source.quantization, source.dequantized) == ("gguf", "Q8_0", True)
    if hooked_available():  # the same record as the HookedTransformer's
        hooked = get_provenance(load_model(path, device="cpu"))
        assert hooked is not None
        assert (hooked.sha256, hooked.tensor_types) == (source.sha256, source.tensor_types)


def test_checkpoint_without_tokenizer_files_loads_on_every_backend(checkpoint, tmp_path):
    """A local Hugging Face checkpoint holding only weights and config loads on the bridge as
    on the hooked backend: no tokenizer (token ids only, no BOS), the model's own logits, and
    layer scores that telescope to its log-probability; a string prompt is one clear error."""
    import shutil

    from transformers import AutoModelForCausalLM

    from mechcna.engine.projection import final_norm_state

    _, path = checkpoint
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(path / name, bare / name)
    hf = AutoModelForCausalLM.from_pretrained(bare, local_files_only=True).eval()
    tokens = torch.tensor([[1, 5, 7, 9, 4]])
    with torch.no_grad():
        expect = hf(tokens).logits[0].log_softmax(-1)
    backends = ["bridge", "hooked"] if hooked_available() else ["bridge"]
    layers = []
    for backend in backends:
        model = load_model(bare, device="cpu", backend=backend)
        assert model.tokenizer is None and backend_of(model) == backend
        source = mechcna.get_provenance(model)
        assert source.describe().endswith("(huggingface; no BOS: no tokenizer)")
        with torch.no_grad():
            got = model(tokens)[0].log_softmax(-1)
        torch.testing.assert_close(got, expect, atol=TOL, rtol=0)
        res = mechcna.layer_importance(model, tokens)
        target = int(expect[-1].argmax())
        with torch.no_grad():
            embed = model.run_with_cache(tokens)[1]["blocks.0.hook_resid_pre"][0, -1]
        scale = final_norm_state(model, tokens).scale[0]
        base = mechcna.project_to_vocab(model, embed, scale).detach()
        total = float(expect[-1, target] - base.double().log_softmax(-1)[target])
        assert float(res.scores.sum()) == pytest.approx(total, abs=1e-4)
        layers.append(res.scores)
        with pytest.raises(mechcna.errors.TokenizationError, match="no tokenizer"):
            mechcna.layer_importance(model, "3+5=")
    for other in layers[1:]:
        torch.testing.assert_close(other, layers[0], atol=TOL, rtol=0)
