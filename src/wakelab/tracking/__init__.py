"""The only place that talks to MLflow's client: runs, params, metrics, artifacts, datasets, retries and tag limits, and
the sync of what a run kept while its server was away. Tracking layer: imports only the core and storage."""
