"""Write tests/fixtures/<method>_*.npz from the authors' code: ``python -m tools.reference_fixtures METHOD --ref PATH``.

METHOD is one of the modules of this package (adaclip, anomalyclip, crane, vip2clip, winclip). Each runs in its own
process because the reference repositories use clashing top-level module names. See README.md beside this file.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path

import torch


def main() -> None:
    here = Path(__file__).parent
    methods = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in ("common", "__main__"))
    parser = argparse.ArgumentParser(prog="python -m tools.reference_fixtures", description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=methods)
    parser.add_argument("--ref", required=True, help="path to a checkout of the method's reference repository "
                        "(winclip: a venv with anomalib 2.7.0, see README.md)")
    parser.add_argument("--dinov2", help="crane: a checkout of facebookresearch/dinov2 (writes the Crane+ fixtures)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    module = importlib.import_module(f"tools.reference_fixtures.{args.method}")
    extra = {"dinov2": args.dinov2} if args.dinov2 else {}
    module.main(args.ref, **extra)


if __name__ == "__main__":
    main()
