"""FLYT learned scorer and M-FLYT score mixing: scorers trained against downstream hypergradients."""
