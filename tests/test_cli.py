from mechcna.cli import main


def test_demo_runs_in_process(tmp_path, capsys):
    assert main(["demo", "--quiet", "--pairs", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "residual self-check passed" in out
    assert "CNA against ablating head" in out and "random" in out
    assert (tmp_path / "cna.html").stat().st_size > 0


def test_attribute_and_cna_subcommands(tmp_path, capsys):
    from mechcna import save_checkpoint
    from tests.helpers import build

    ck = save_checkpoint(build("llama"), tmp_path / "m")
    for level in ("layers", "heads", "ffn", "attention"):
        assert main(["attribute", "--model", str(ck), "--prompt", "12+7=", "--level", level]) == 0
    html, csv = tmp_path / "f.html", tmp_path / "f.csv"
    args = ["cna", "--model", str(ck), "--prompt", "12+7=", "--prompt", "3+5="]
    code = main([*args, "--head", "1.0", "--top", "3", "--html", str(html), "--csv", str(csv)])
    assert code == 0 and html.stat().st_size > 0 and csv.stat().st_size > 0
    out = capsys.readouterr().out
    assert "CNA against ablating 1.0" in out and "prompt '3+5='" in out
