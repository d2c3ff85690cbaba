"""`python -m benchmarks.generate_speed ...` (from the repository root)."""

import sys

if __package__:
    from .bench import main
else:
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.generate_speed.bench import main

sys.exit(main())
