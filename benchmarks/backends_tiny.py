"""Largest HookedTransformer-vs-TransformerBridge difference per core analysis, tiny models.

Under TransformerLens 3.x both backends run here; under 4.x the bridge is compared with the
HookedTransformer results in ``build/backend-golden.pt`` (written by ``make test-tl4``):
    .venv/bin/python benchmarks/backends_tiny.py; .venv-tl4/bin/python benchmarks/backends_tiny.py
"""

import tempfile
from pathlib import Path

import torch

from mechcna import load_model
from mechcna.models.backend import hooked_available
from tests.test_backends import build_checkpoint, core_results

GOLDEN = Path("build/backend-golden.pt")


def main() -> None:
    from importlib.metadata import version

    print(f"TransformerLens {version('transformer-lens')}")
    for kind in ("gpt2", "llama"):
        with tempfile.TemporaryDirectory() as tmp:
            path = build_checkpoint(kind, Path(tmp) / "tiny")
            bridge = core_results(load_model(path, device="cpu", backend="bridge"))
            if hooked_available():
                hooked = core_results(load_model(path, device="cpu", backend="hooked"))
            else:
                hooked = torch.load(GOLDEN)[kind]["results"]
        for name, value in bridge.items():
            diff = float((value.double() - hooked[name].double()).abs().max())
            print(f"{kind:<6} {name:<22} {diff:.1e}")


if __name__ == "__main__":
    main()
