"""One module per pipeline stage: plain functions that do the work, thin Prefect task wrappers."""
