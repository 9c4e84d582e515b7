"""The pipeline side: the config check, inputs checked before any job, one cell's run, the cell lock and attempts, and the adapters the rule scripts call."""
