"""clipsift: DataComp-style data filtering for CLIP pretraining (FLYT, M-FLYT, Soft Cap Sampling)."""
__version__ = "0.1.0"
