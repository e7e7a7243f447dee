"""CeVAEAnomaly core: unsupervised anomaly localisation in brain MRI with a context-encoding VAE.

Importing the package is cheap; torch and SimpleITK are imported by the modules that need them.
"""
__version__ = "0.1.0"
