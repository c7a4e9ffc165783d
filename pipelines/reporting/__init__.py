"""Reading runs back from MLflow, ranking them (pure functions) and rendering tables, plots and reports."""
