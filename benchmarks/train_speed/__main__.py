"""`python -m benchmarks.train_speed ...` (from the repository root)."""

import sys

if __package__:
    from .cli import main
else:  # `python benchmarks/train_speed ...`: make the package importable by its full name
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.train_speed.cli import main

sys.exit(main())
