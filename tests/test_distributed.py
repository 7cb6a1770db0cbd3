"""Distributed analyses on a local Ray cluster of 2 CPUs: each equals the single-process result.

The workers load their own model replicas by name (the shipped model) or path (a tiny Llama
checkpoint saved here), so these tests also cover loading on the worker. One test kills a
worker process in the middle of a run and checks the retried shard leaves the result unchanged.
"""

import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray")

import mechcna  # noqa: E402
from mechcna import distributed  # noqa: E402
from tests.helpers import PROMPTS, build  # noqa: E402

SHIPPED = "mechcna/arith-small"
CPU = {"device": "cpu"}
F64 = {"device": "cpu", "dtype": torch.float64}


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():  # pragma: no cover - another module's cluster
        ray.shutdown()
    ray_mod = distributed.connect(num_cpus=2)
    # this module's functions (the worker-kill test's) travel by value, not by import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_mod
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


@pytest.fixture(scope="module")
def shipped():
    return mechcna.load_model(SHIPPED, device="cpu")


@pytest.fixture(scope="module")
def dataset(shipped):
    return mechcna.arithmetic_dataset(["+", "-"], [1, 2], [1, 2], n_pairs=5, tokenizer=shipped)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> str:
    model = build("llama", dtype=torch.float64)
    return str(mechcna.save_checkpoint(model, tmp_path_factory.mktemp("ray") / "tiny-llama"))


@pytest.fixture(scope="module")
def llama(llama_path):
    return mechcna.load_model(llama_path, **F64)


def assert_same_sweep(got, want, atol: float) -> None:
    assert got.heads == want.heads
    assert got.n_cases == want.n_cases
    assert torch.equal(got.targets, want.targets)
    assert torch.equal(got.prediction, want.prediction)
    assert torch.equal(got.correct, want.correct)
    assert torch.equal(got.base_prediction, want.base_prediction)
    torch.testing.assert_close(got.logprob, want.logprob, rtol=0, atol=atol)
    torch.testing.assert_close(got.base_logprob, want.base_logprob, rtol=0, atol=atol)
    assert got.prompts == want.prompts
    assert got.labels.equals(want.labels)
    assert (got.mode, got.n_layers, got.n_heads) == (want.mode, want.n_layers, want.n_heads)
    if want.means is not None:
        assert got.means is not None and set(got.means) == set(want.means)
        for hd, m in want.means.items():
            torch.testing.assert_close(got.means[hd].cpu(), m.cpu(), rtol=0, atol=atol)


def assert_same_scores(got, want, atol: float) -> None:
    assert type(got) is type(want) and got.dims == want.dims
    assert got.scores.shape == want.scores.shape
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=atol)
    for name, t in want.extras.items():
        torch.testing.assert_close(got.extras[name], t, rtol=0, atol=atol)
    assert torch.equal(got.target_ids, want.target_ids)
    assert got.targets == want.targets and got.prompts == want.prompts
    for p in range(want.n_prompts):  # identical rankings of each prompt's top entries
        assert got.top(5, prompt=p)["label"].tolist() == want.top(5, prompt=p)["label"].tolist()


# ---------------------------------------------------------------------------- head sweep
def test_head_sweep_shipped_model_equals_single_process(cluster, shipped, dataset):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs (threads=1): the same reduction order
    try:
        want = mechcna.head_sweep(shipped, dataset, batch_size=8, heads_per_pass=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    got = distributed.head_sweep(
        SHIPPED, dataset, load=CPU, batch_size=8, heads_per_pass=2, case_shards=3,
        head_shards=2, progress=False,
    )  # fmt: skip
    assert_same_sweep(got, want, atol=1e-5)
    # shards follow the single process's batches and passes: with the same thread count the
    # numbers are the same ones
    assert torch.equal(got.logprob, want.logprob)
    assert torch.equal(got.prediction, want.prediction)


def test_head_sweep_llama_mean_mode_and_head_order(cluster, llama, llama_path):
    prompts = [*PROMPTS, "the product of 2 and 3 is", "7-4=", "a woman works as a nurse"]
    targets = ["8", "1", "basketball", "6", "3", "nurse"]
    heads = [(1, 3), (0, 1), (1, 0), (0, 2), (1, 2)]
    for mode in ("zero", "mean"):
        want = mechcna.head_sweep(
            llama, prompts, targets, heads=heads, mode=mode, batch_size=2, heads_per_pass=2,
            progress=False,
        )  # fmt: skip
        got = distributed.head_sweep(
            llama_path, prompts, targets, load=F64, heads=heads, mode=mode, batch_size=2,
            heads_per_pass=2, case_shards=2, head_shards=3, progress=False,
        )  # fmt: skip
        assert_same_sweep(got, want, atol=1e-12)


def test_head_sweep_all_heads_own_targets(cluster, llama, llama_path):
    want = mechcna.head_sweep(llama, PROMPTS, batch_size=1, progress=False)
    got = distributed.head_sweep(llama_path, PROMPTS, load=F64, batch_size=1, progress=False)
    assert_same_sweep(got, want, atol=1e-12)


# ---------------------------------------------------------------------------- attribution
ANALYSES = [
    ("neuron_importance", {}),
    ("attention_neuron_importance", {}),
    ("layer_importance", {}),
    ("head_importance", {}),
    ("head_importance", {"by_position": True}),
]


@pytest.mark.parametrize(("name", "options"), ANALYSES, ids=lambda x: str(x))
def test_attribution_shipped_model_equals_single_process(cluster, shipped, dataset, name,
                                                         options):  # fmt: skip
    prompts = list(dataset.prompts[:7])  # two templates: unequal lengths across shards
    want = getattr(mechcna, name)(shipped, prompts, **options)
    got = getattr(distributed, name)(
        SHIPPED, prompts, load=CPU, shards=3, progress=False, **options
    )
    assert_same_scores(got, want, atol=1e-4)


@pytest.mark.parametrize(("name", "options"), ANALYSES, ids=lambda x: str(x))
def test_attribution_llama_float64(cluster, llama, llama_path, name, options):
    prompts = [*PROMPTS, "7-4="]
    targets = ["8", "1", "basketball", "3"]
    want = getattr(mechcna, name)(llama, prompts, targets, **options)
    got = getattr(distributed, name)(
        llama_path, prompts, targets, load=F64, shards=3, progress=False, **options
    )
    assert_same_scores(got, want, atol=1e-12)
    if name == "layer_importance":
        torch.testing.assert_close(got.final_logprob, want.final_logprob, rtol=0, atol=1e-12)
        torch.testing.assert_close(
            got.embedding_logprob, want.embedding_logprob, rtol=0, atol=1e-12
        )
    if name == "neuron_importance":  # attention neurons are also scored at padding
        assert got.stats.scored == want.stats.scored


def test_comparison_scores_llama_float64(cluster, llama, llama_path):
    from mechcna.analyses.methods import comparison_scores

    prompts = [*PROMPTS, "7-4="]
    want = comparison_scores(llama, prompts)
    got = distributed.comparison_scores(llama_path, prompts, load=F64, shards=2, progress=False)
    assert got.methods == want.methods
    assert_same_scores(got, want, atol=1e-10)


def test_dataset_cna_with_an_intervention_and_with_a_second_model(cluster, llama, llama_path,
                                                                  tmp_path):  # fmt: skip
    from mechcna.analyses.comparative import compare_neurons

    prompts = [*PROMPTS, "7-4="]
    ablation = mechcna.HeadAblation([(0, 1), (1, 2)])
    want = compare_neurons(llama, prompts, ablation)
    got = distributed.compare_neurons(llama_path, prompts, ablation, load=F64, shards=3,
                                      progress=False)  # fmt: skip
    assert_same_scores(got, want, atol=1e-12)
    assert got.layers_from == want.layers_from and got.stats.scored == want.stats.scored
    other = build("llama", dtype=torch.float64, seed=5)
    other_path = str(mechcna.save_checkpoint(other, tmp_path / "other"))
    want = compare_neurons(llama, prompts, mechcna.load_model(other_path, **F64))
    got = distributed.compare_neurons(llama_path, prompts, other_path, load=F64, shards=2,
                                      progress=False)  # fmt: skip
    assert_same_scores(got, want, atol=1e-12)
    with pytest.raises(mechcna.MechcnaError, match="name or path"):
        distributed.compare_neurons(llama_path, prompts, other, load=F64)


def test_mask_keep_table_shipped_and_llama_equal_single_process(cluster, shipped, llama,
                                                               llama_path):  # fmt: skip
    from mechcna.analyses.case_ablation import mask_keep_table
    from mechcna.analyses.comparative import compare_neurons

    for model, source, load, prompts, ks, deep in [
        (shipped, SHIPPED, CPU, ["3+5=", "2+2=", "7-4=", "9-1=", "6+1="], (3, 20), None),
        (llama, llama_path, F64, [*PROMPTS, "7-4="], (2, 5), [0, 1]),
    ]:
        cna = compare_neurons(model, prompts, mechcna.HeadAblation([(1, 0)]))
        want = mask_keep_table(model, prompts, cna, ks=ks, deep_layers=deep, seed=3,
                               progress=False)  # fmt: skip
        got = distributed.mask_keep_table(source, prompts, cna, ks=ks, deep_layers=deep, seed=3,
                                          load=load, shards=3, progress=False)  # fmt: skip
        pd.testing.assert_frame_equal(got, want, rtol=0, atol=0)
        assert got.attrs == want.attrs
    with pytest.raises(mechcna.MechcnaError, match="prompts for a comparison"):
        distributed.mask_keep_table(llama_path, PROMPTS[:1], cna, load=F64, ks=(2,))


def test_joins_an_existing_cluster_by_address_and_by_ray_address(tmp_path):
    """A cluster started outside mechcna (``ray start --head``) is joined with ``address=``
    and with ``RAY_ADDRESS``; results equal one process (run in a child interpreter, since this
    process already holds the module's local cluster)."""
    import contextlib
    import json
    import signal
    import socket
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    start = [ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats"]  # fmt: skip
    # --block in a session of its own: stopping it stops this cluster only (``ray stop`` would
    # stop every Ray cluster on the machine, the module's included, and with it this process)
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    script = f"""
import json, os, sys, ray, mechcna
from mechcna import distributed
PROMPTS = ["3+5=", "12+7=", "9-4="]
model = mechcna.load_model("{SHIPPED}", device="cpu")
want = mechcna.neuron_importance(model, PROMPTS).scores
out = {{}}
for how in ("address", "env"):
    address = "127.0.0.1:{port}" if how == "address" else None
    if how == "env":
        os.environ["RAY_ADDRESS"] = "127.0.0.1:{port}"
    got = distributed.neuron_importance("{SHIPPED}", PROMPTS, address=address, shards=2,
                                        load={{"device": "cpu"}}, progress=False).scores
    ctx = ray.get_runtime_context()
    out[how] = {{"err": float((got - want).abs().max()), "gcs": ctx.gcs_address}}
    ray.shutdown()
print(json.dumps(out))
"""
    try:
        deadline = time.monotonic() + 180
        while True:  # the head's GCS accepts connections once the cluster is up
            assert head.poll() is None, "ray start --head exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the external cluster did not come up"
                time.sleep(1)
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
    finally:
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(timeout=wait)
                break
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for how in ("address", "env"):
        assert out[how]["gcs"].endswith(f":{port}"), out  # the external cluster, not a new one
        assert out[how]["err"] <= 1e-4, out


def test_reproduce_on_ray_equals_one_process(cluster, shipped):
    """The arithmetic paper's stages (head sweep, CNA, mask / keep) on 2 Ray workers give the
    single-process tables and claims."""
    from dataclasses import replace

    from mechcna.reproduce import RayRun, ReproduceSettings, reproduce

    s = replace(ReproduceSettings.quick(), sweep_cases=12, cna_cases=6, cna_ks=(10,))
    want = reproduce(shipped, "arithmetic", settings=s, progress=False)
    distributed.LAST_RUN.clear()
    got = reproduce(shipped, "arithmetic", settings=s, progress=False,
                    ray=RayRun(SHIPPED, load=CPU, workers=2))  # fmt: skip
    assert distributed.LAST_RUN.get("tasks", 0) >= 2  # the work went to the workers
    assert [r.name for r in got.stages] == [r.name for r in want.stages]
    for a, b in zip(got.stages, want.stages, strict=True):
        assert sorted(a.tables) == sorted(b.tables), a.name
        for name in b.tables:
            pd.testing.assert_frame_equal(a.tables[name], b.tables[name], rtol=0, atol=1e-4,
                                          obj=f"{a.name}/{name}")  # fmt: skip
    cols = ["claim", "n", "verdict"]
    pd.testing.assert_frame_equal(got.claims[cols], want.claims[cols])
    num = ["estimate", "lo", "hi"]
    pd.testing.assert_frame_equal(got.claims[num], want.claims[num], rtol=0, atol=1e-4)


def test_reproduce_on_ray_refuses_workers_with_other_weights(cluster, llama_path):
    from mechcna.reproduce import RayRun
    from mechcna.reproduce.scale import check_workers

    other = build("llama", dtype=torch.float64, seed=11)
    with pytest.raises(mechcna.MechcnaError, match="other weights"):
        check_workers(other, RayRun(llama_path, load=F64))
    check_workers(mechcna.load_model(llama_path, **F64), RayRun(llama_path, load=F64))


# ---------------------------------------------------------------------------- command line
@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("head-sweep", ["--operations", "+", "--digits", "1", "--pairs", "3"]),
        ("attribute", ["--prompt", "3+5=", "--prompt", "12+7=", "--level", "all"]),
    ],
)
def test_cli_on_ray_writes_the_single_process_tables(cluster, tmp_path, name, args):
    from mechcna.cli import main

    local, remote = tmp_path / "local", tmp_path / "ray"
    assert main([name, *args, "--quiet", "--out", str(local)]) == 0
    assert main([name, *args, "--ray", "--workers", "2", "--quiet", "--out", str(remote)]) == 0
    tables = sorted(p.name for p in local.glob("table-*.csv"))
    assert tables and tables == sorted(p.name for p in remote.glob("table-*.csv"))
    for t in tables:  # float32, prompts batched differently: the same rows, scores to 1e-4
        a, b = pd.read_csv(local / t), pd.read_csv(remote / t)
        assert list(a.columns) == list(b.columns) and a.shape == b.shape, t
        numeric = [c for c in a.columns if a[c].dtype.kind == "f"]
        pd.testing.assert_frame_equal(a.drop(columns=numeric), b.drop(columns=numeric))
        pd.testing.assert_frame_equal(a[numeric], b[numeric], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- failures
def _dies_once(model, marker: str, **kwargs):
    """A shard that kills its worker process the first time it runs anywhere."""
    path = Path(marker)
    if not path.exists():
        path.write_text("killed")
        os._exit(1)
    return mechcna.neuron_importance(model, **kwargs)


def test_killed_worker_is_retried_with_an_identical_result(cluster, llama, llama_path,
                                                           tmp_path):  # fmt: skip
    prompts = [*PROMPTS, "7-4="]
    want = mechcna.neuron_importance(llama, prompts)
    marker, spared = tmp_path / "killed", tmp_path / "spared"
    spared.write_text("")  # the second shard runs through
    shards = [{"marker": str(marker), "prompts": prompts[:2]},
              {"marker": str(spared), "prompts": prompts[2:]}]  # fmt: skip
    parts = distributed.run_shards(llama_path, _dies_once, shards, load=F64, progress=False)
    assert marker.read_text() == "killed"  # the first shard's worker died once
    got = distributed.merge_scores(parts)
    assert_same_scores(got, want, atol=1e-12)


def test_no_retries_left_raises(cluster, llama_path, tmp_path):
    shards = [{"marker": str(tmp_path / "m"), "prompts": PROMPTS}]
    with pytest.raises(ray.exceptions.RayError):
        distributed.run_shards(
            llama_path, _dies_once, shards, load=F64, max_retries=0, progress=False
        )


def test_a_model_object_is_refused(llama):
    with pytest.raises(mechcna.MechcnaError, match="name or path"):
        distributed.neuron_importance(llama, PROMPTS)


def test_merge_refuses_mixed_results(llama):
    a = mechcna.layer_importance(llama, PROMPTS[:1])
    b = mechcna.head_importance(llama, PROMPTS[1:])
    with pytest.raises(mechcna.MechcnaError, match="one kind"):
        distributed.merge_scores([a, b])
