"""Every subcommand invoked once in-process, on the shipped model or a tiny checkpoint."""

import json
from pathlib import Path

import pytest

from mechcna.cli import COMMAND_MODULES, build_parser, main
from mechcna.cli.base import COMMANDS
from tests.test_report import assert_self_contained


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mechcna import save_checkpoint
    from tests.helpers import build

    return str(save_checkpoint(build("llama"), tmp_path_factory.mktemp("m") / "tiny"))


# (subcommand, arguments); "{tiny}" is a tiny Llama-like checkpoint, otherwise the shipped model
INVOCATIONS = [
    ("attribute", ["--model", "{tiny}", "--prompt", "12+7=", "--prompt", "3+5=", "--level", "all"]),
    ("cna", ["--prompt", "3+5=", "--prompt", "2+4=", "--head", "0.0", "--mask-keep", "--ks", "5"]),
    ("compare-inputs", ["--prompt", "A woman works as a", "--other-prompt", "A man works as a",
                        "--target", "nurse", "--top", "3"]),
    ("query-neurons", ["--model", "{tiny}", "--prompt", "3+5=", "--k", "5", "--top", "3"]),
    ("query-layers", ["--model", "{tiny}", "--prompt", "3+5=", "--kind", "attention"]),
    ("transfer", ["--neuron", "1.12", "--step", "2:*:3", "--step", "3:1:3", "--prompt", "3+5="]),
    ("methods", ["--model", "{tiny}", "--prompt", "3+5=", "--prompt", "1+2=", "--k", "3"]),
    ("top-tokens", ["--neuron", "3.266", "--neuron", "3_149", "--k", "5"]),
    ("check-model", []),
    ("accuracy", ["--operations", "+", "--digits", "1", "--pairs", "3", "--ablate-head", "0.0"]),
    ("head-sweep", ["--operations", "+", "--digits", "1", "--pairs", "3"]),
    ("zero-shot", ["--thresholds", "2", "4", "--mask-test", "--operations", "+", "--digits", "1",
                   "--pairs", "2"]),
    ("report", ["--model", "{tiny}", "--prompt", "3+5=", "--k", "5"]),
    ("demo", ["--pairs", "3"]),
    ("reproduce", ["--paper", "arithmetic", "--quick"]),
    ("lora", ["--layers", "0", "1", "--train-pairs", "4", "--test-pairs", "2", "--steps", "2",
              "--cna-cases", "2", "--ks", "5", "2"]),
    ("prune", ["--prune-layers", "3", "--k", "2", "--cna-pairs", "1", "--cna-templates", "4",
               "--train-pairs", "4", "--test-pairs", "2", "--steps", "2"]),
    ("bias", ["--random", "1", "--cost-pairs", "2"]),
    ("compare-claims", ["{root}/docs/reproduce/smollm2-135m-quick.md",
                        "{root}/docs/reproduce/gemma-3-270m-quick.md", "--names", "S", "G"]),
]  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


def test_every_subcommand_has_one_invocation_and_an_example():
    build_parser()
    assert [name for name, _ in INVOCATIONS if name in COMMANDS] == [n for n, _ in INVOCATIONS]
    core = {m.rsplit(".", 1)[1] for m in COMMAND_MODULES} >= {"analyses", "arithmetic", "runs"}
    assert core
    tested = {name for name, _ in INVOCATIONS}
    # subcommands registered by other modules (reproduce, ...) are tested next to their code
    from mechcna.cli import analyses, applications, arithmetic, papers, runs

    modules = (analyses, applications, arithmetic, papers, runs)
    mine = {c.name for c in COMMANDS.values() if c.run.__module__ in [m.__name__ for m in modules]}
    # train-arithmetic: tests/test_training.py::test_cli_train_arithmetic (a minute of training)
    assert mine == tested | {"train-arithmetic"}
    for cmd in COMMANDS.values():
        assert cmd.example.startswith("mechcna " + cmd.name)


@pytest.mark.parametrize("name,args", INVOCATIONS, ids=[n for n, _ in INVOCATIONS])
def test_subcommand(name, args, tiny, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [name, *(a.format(tiny=tiny, root=ROOT) for a in args), "--quiet", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("# ") and f"wrote {out / 'index.html'}" in text
    assert (out / "report.txt").read_text() in text
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["extra"]["command"].startswith(f"mechcna {name}")
    page = (out / "index.html").read_text()
    assert_self_contained(page, n_figures=page.count('<div id="figure-'))
    assert list(out.glob("table-*.csv"))
    if name in ("lora", "prune", "bias"):  # the applications also write every number as JSON
        assert json.loads((out / "results.json").read_text())


def test_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main(["top-tokens", "--neuron", "99.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mechcna: error: ") and err.count("\n") == 1 and "99" in err
    with pytest.raises(Exception, match="99"):
        main(["top-tokens", "--neuron", "99.0", "--debug"])
    assert main(["cna", "--prompt", "3+5="]) == 2  # neither --head nor --second-model
    assert "--head" in capsys.readouterr().err
    assert main(["top-tokens", "--neuron", "3.x"]) == 2
    assert "LAYER.NEURON" in capsys.readouterr().err
    assert main(["attribute", "--model", str(tmp_path / "nowhere"), "--prompt", "1"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["bias", "--template", "A person works as a"]) == 2
    assert "{g}" in capsys.readouterr().err
    assert main(["prune", "--prune-layers", "9"]) == 2  # refused before any training
    assert "layer" in capsys.readouterr().err


def test_device_option_loads_the_model_there_or_says_why_not(tmp_path, capsys, monkeypatch):
    import mechcna.models.loading

    seen = []
    load = mechcna.models.loading.load_model

    def spy(*a, **k):
        seen.append(k.get("device"))
        return load(*a, **k)

    monkeypatch.setattr(mechcna.models.loading, "load_model", spy)
    argv = ["top-tokens", "--neuron", "3.266", "--quiet", "--out", str(tmp_path / "o")]
    assert main([*argv, "--device", "cpu"]) == 0
    assert seen == ["cpu"]
    assert main([*argv[:-2], "--device", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mechcna: error: ") and err.count("\n") == 1 and "nowhere" in err


def test_out_is_checked_before_any_computation(tmp_path, capsys, monkeypatch):
    import mechcna.models.loading

    def fail(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(mechcna.models.loading, "load_model", fail)
    file = tmp_path / "file"
    file.write_text("")
    assert main(["demo", "--out", str(file)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_non_empty_out_is_refused_before_computing_unless_overwrite(
    tmp_path, capsys, monkeypatch
):
    import mechcna.models.loading

    out = tmp_path / "out"
    argv = ["top-tokens", "--neuron", "3.266", "--neuron", "3.149", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    assert len(list(out.glob("table-*.csv"))) == 2
    load = mechcna.models.loading.load_model

    def fail(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(mechcna.models.loading, "load_model", fail)
    capsys.readouterr()
    assert main(argv[:3] + argv[5:]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
    monkeypatch.setattr(mechcna.models.loading, "load_model", load)
    assert main(argv[:3] + argv[5:] + ["--overwrite"]) == 0
    assert [p.name for p in out.glob("table-*.csv")] == ["table-01-3-266.csv"]


def test_version_and_help(capsys):
    from mechcna import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mechcna {__version__}"
    with pytest.raises(SystemExit):
        main(["attribute", "--help"])
    help_text = capsys.readouterr().out
    assert "example:" in help_text and "mechcna/arith-small" in help_text


def test_help_imports_neither_torch_nor_pandas():
    # `mechcna --help` used to spend ~5 s importing torch and TransformerLens (issue 23)
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from mechcna.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['cna', '--help'])\n"
        "heavy = ('torch', 'transformer_lens', 'pandas', 'plotly')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_quiet_hides_progress_bars_and_the_dev_extra_has_ipywidgets():
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from mechcna.cli import main\n"
        "main(['top-tokens', '--neuron', '3.266', '--k', '2', '--quiet'])\n"
        "from tqdm.auto import tqdm\n"
        "list(tqdm(range(3), desc='Converting and de-quantizing GGUF tensors'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "HF_HUB_DIS"))}
    run = {"capture_output": True, "text": True, "env": env}
    out = subprocess.run([sys.executable, "-c", code], check=True, **run)
    assert "Converting" not in out.stderr and "%|" not in out.stderr
    noisy = subprocess.run([sys.executable, "-c", code.replace(", '--quiet'", "")], **run)
    assert "Converting" in noisy.stderr  # the check can fail
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    dev = re.search(r"\ndev = \[(.*?)\n\]", pyproject, flags=re.S)
    assert dev is not None and '"ipywidgets' in dev.group(1)


def test_every_public_name_resolves_lazily():
    # mechcna/__init__ imports on first use: each name of __all__ must be in its table
    import mechcna

    for name in mechcna.__all__:
        assert getattr(mechcna, name) is not None, name
    assert mechcna.errors.MechcnaError is mechcna.MechcnaError


def test_reproduce_resume_writes_its_page_beside_its_checkpoint(tmp_path, monkeypatch):
    """``--resume`` saves stages under ``--out/checkpoint-*``: the page is then written into
    that folder (the saved stages are not old results), and a rerun with ``--overwrite``
    replaces the page, keeps the saved stages and loads them instead of recomputing."""
    from mechcna.reproduce import plan

    out = tmp_path / "run"
    args = ["reproduce", "--model", "mechcna/arith-small", "--paper", "arithmetic", "--quick",
            "--resume", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    saved = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1 and any(saved[0].iterdir()) and (out / "index.html").is_file()
    # the attribution calls of each stage were kept shard by shard too (scale.memo)
    assert list((saved[0] / "calls").glob("compare_neurons-*.pt"))
    assert main(args) != 0  # old results without --overwrite: refused, before any work
    loads = []
    original = plan.Checkpoint.load
    monkeypatch.setattr(plan.Checkpoint, "load",
                        lambda self, name: loads.append(name) or original(self, name))  # fmt: skip
    assert main([*args, "--overwrite"]) == 0
    assert saved[0].is_dir() and (out / "index.html").is_file()
    assert "heads" in loads
