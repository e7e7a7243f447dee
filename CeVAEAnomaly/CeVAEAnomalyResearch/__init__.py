"""Research code around CeVAEAnomalyLib: synthetic lesions, evaluation, figures, model card,
sample data and the demo. Not part of the Slicer extension's runtime."""
