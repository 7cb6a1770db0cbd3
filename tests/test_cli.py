from mechcna.cli import main


def test_demo_runs_in_process(capsys):
    assert main(["demo", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "residual self-check passed" in out
    assert "delta log p" in out
