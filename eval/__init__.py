"""Zero-shot evaluation (clip_benchmark / DataComp formats): `clipsift eval`.

    from clipsift.eval import ModelSpec, evaluate, load_model
"""
from clipsift.eval.evaluate import EvalConfig, evaluate, run
from clipsift.eval.models import LoadedModel, ModelSpec, load_model

__all__ = ["EvalConfig", "LoadedModel", "ModelSpec", "evaluate", "load_model", "run"]
