"""The report: collecting cells, the tables and figures, the published reference values."""
