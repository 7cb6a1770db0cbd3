import pytest
import torch

from mechcna import (
    HeadAblation,
    KeepNeurons,
    MechcnaError,
    NeuronEdit,
    Patch,
    apply_to_weights,
    hook_name,
    intervene,
)
from mechcna.interventions.edits import collect_hooks
from tests.helpers import PROMPTS, build


def _tokens(model):
    return model.to_tokens(PROMPTS)


def _interventions(model):
    ref = _tokens(model)
    return [
        HeadAblation([(0, 1), (1, 3)]),
        HeadAblation.mean_over(model, [(1, 0), (0, 2)], ref),
        NeuronEdit([(0, 3), (1, 7), (1, 8)]),
        NeuronEdit([(1, 2)], mode="scale", value=2.5),
        NeuronEdit([(0, 4)], mode="set", value=-1.5),
        KeepNeurons([(1, 0), (1, 5)], layers=[1]),
    ]


@pytest.mark.parametrize("which", range(6))
def test_hook_equals_weights(kind, which):
    model = build(kind, dtype=torch.float64)
    iv = _interventions(model)[which]
    tokens = _tokens(model)
    with torch.no_grad():
        clean = model(tokens)
        with intervene(model, iv):
            hooked = model(tokens)
        edited = apply_to_weights(model, iv)
        weights = edited(tokens)
        after = model(tokens)
    assert (hooked - clean).abs().max() > 1e-6  # the intervention does something
    torch.testing.assert_close(hooked, weights, atol=1e-10, rtol=0)
    torch.testing.assert_close(after, clean, atol=0, rtol=0)  # original untouched


def test_hook_equals_weights_all_combined(kind):
    model = build(kind, dtype=torch.float64)
    ivs = _interventions(model)[:5]
    tokens = _tokens(model)
    with torch.no_grad(), intervene(model, *ivs):
        hooked = model(tokens)
    with torch.no_grad():
        weights = apply_to_weights(model, *ivs)(tokens)
    torch.testing.assert_close(hooked, weights, atol=1e-10, rtol=0)


def test_no_hooks_left_after_exception(model):
    tokens = _tokens(model)
    clean = model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(model, HeadAblation([(0, 0)]), NeuronEdit([(1, 1)])):
            assert any(h.fwd_hooks for h in model.hook_dict.values())
            raise RuntimeError("boom")
    assert not any(h.fwd_hooks for h in model.hook_dict.values())
    torch.testing.assert_close(model(tokens), clean, atol=0, rtol=0)


def test_contexts_nest_and_compose(model):
    tokens = _tokens(model)
    a, b = HeadAblation([(0, 0)]), NeuronEdit([(1, 1), (0, 2)])
    with torch.no_grad():
        with intervene(model, a, b):
            both = model(tokens)
        with intervene(model, a):
            with intervene(model, b):
                nested = model(tokens)
            only_a = model(tokens)
        with intervene(model, a):
            again_a = model(tokens)
    torch.testing.assert_close(nested, both, atol=0, rtol=0)
    torch.testing.assert_close(only_a, again_a, atol=0, rtol=0)
    assert not any(h.fwd_hooks for h in model.hook_dict.values())


def test_positions_restrict_the_edit(model):
    tokens = model.to_tokens(["the sum of 3 and 5 is"])
    with torch.no_grad():
        clean = model(tokens)
        with intervene(model, HeadAblation([(1, 0)], positions=[-1])):
            last_only = model(tokens)
    # only the last position's output changes (attention is causal; layer 1 is the last)
    torch.testing.assert_close(last_only[:, :-1], clean[:, :-1], atol=0, rtol=0)
    assert (last_only[:, -1] - clean[:, -1]).abs().max() > 1e-6
    with pytest.raises(MechcnaError, match="no weight-space"):
        apply_to_weights(model, HeadAblation([(1, 0)], positions=[-1]))


def test_zero_neuron_sets_post_to_zero(model):
    tokens = _tokens(model)
    with torch.no_grad(), intervene(model, NeuronEdit([(1, 5)])):
        _, cache = model.run_with_cache(tokens)
    assert torch.all(cache[hook_name("post", 1)][..., 5] == 0)


def test_keep_neurons_keeps_only_those(model):
    tokens = _tokens(model)
    with torch.no_grad(), intervene(model, KeepNeurons([(1, 3)], layers=[1])):
        _, cache = model.run_with_cache(tokens)
    post = cache[hook_name("post", 1)]
    assert torch.all(post[..., :3] == 0) and torch.all(post[..., 4:] == 0)
    assert post[..., 3].abs().sum() > 0


def test_patch_from_another_run(model):
    a = model.to_tokens(["the sum of 3 and 5 is"])
    b = model.to_tokens(["the sum of 4 and 5 is"])
    with torch.no_grad():
        _, cache_b = model.run_with_cache(b)
        patches = Patch.from_cache(cache_b, [hook_name("resid_pre", 1)])
        with intervene(model, *patches):
            patched = model(a)
        clean_b = model(b)
    torch.testing.assert_close(patched, clean_b, atol=1e-5, rtol=0)


def test_bad_input_errors(model):
    with pytest.raises(MechcnaError, match="head 9 out of range"):
        with intervene(model, HeadAblation([(0, 9)])):
            pass
    with pytest.raises(MechcnaError, match="layer 7 out of range"):
        with intervene(model, NeuronEdit([(7, 0)])):
            pass
    with pytest.raises(MechcnaError, match="mean_over"):
        HeadAblation([(0, 0)], mode="mean")
    with pytest.raises(MechcnaError, match="no hook named"):
        with intervene(model, Patch("blocks.0.nope", torch.zeros(1))):
            pass
    with pytest.raises(MechcnaError, match="not an intervention"):
        collect_hooks(model, ["zero head 0"])


def test_neuron_edit_and_head_ablation_share_the_mode_keyword():
    """One vocabulary: ``mode=`` for both; ``NeuronEdit(op=)`` still works, with a warning,
    and edits exactly as ``mode=`` (a scaled coefficient, checked against the hook's input)."""
    model = build("gpt2", dtype=torch.float64)
    assert HeadAblation([(0, 1)], mode="zero").mode == NeuronEdit([(0, 1)], mode="zero").mode
    new = NeuronEdit([(1, 2)], mode="scale", value=2.5)
    with pytest.warns(DeprecationWarning, match="mode="):
        old = NeuronEdit([(1, 2)], op="scale", value=2.5)
    assert (old.mode, old.value, old.neurons) == (new.mode, new.value, new.neurons)
    assert "mode='scale'" in repr(new) and old.op == "scale"
    tokens = _tokens(model)
    seen = {}

    def grab(post, hook):
        seen["post"] = post.clone()

    name = hook_name("post", 1)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(name, grab)])
        clean = seen["post"]
        for edit in (old, new):
            with intervene(model, edit):
                out = model.run_with_hooks(tokens, fwd_hooks=[])
            torch.testing.assert_close(
                out, apply_to_weights(model, edit)(tokens), atol=1e-10, rtol=0
            )
        expect = clean.clone()
        expect[..., 2] *= 2.5
        edited = {}
        with intervene(model, new):
            model.run_with_hooks(
                tokens, fwd_hooks=[(name, lambda p, hook: edited.setdefault("p", p.clone()))]
            )
    torch.testing.assert_close(edited["p"], expect, atol=1e-12, rtol=0)
    with pytest.raises(MechcnaError, match="give mode"), pytest.warns(DeprecationWarning):
        NeuronEdit([(0, 1)], mode="set", value=1.0, op="scale")
    with pytest.raises(MechcnaError, match="mode must be"):
        NeuronEdit([(0, 1)], mode="double")
