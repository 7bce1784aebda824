"""Imports every module that registers filters, so FILTERS is complete when a config is built."""
from clipsift.filters import baselines, image_based, linear_classifier, negclip, semdedup  # noqa: F401
