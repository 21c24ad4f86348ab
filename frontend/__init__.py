"""Frontend: torch.export capture of a model and import into the IR (built by the frontend issue)."""
