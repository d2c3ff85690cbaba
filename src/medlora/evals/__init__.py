"""`medlora eval`: the measurements (compare.py) and the reports they are written to (report.py)."""
