"""MLflow tracking: what each stage logs (`entries`), how it reaches the store (`mlflow_store`), the per-stage
records with their pending copies (`stage_runs`) and a local server (`server`)."""
