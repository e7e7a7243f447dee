"""Detection engine: model, preprocessing, scoring, post-processing, bundle, calibration, detector."""
