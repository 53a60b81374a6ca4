"""apprentice's online path: the OpenAI-compatible gateway.

Never imports router_models, scikit-learn or torch: the ONNX artifact and its manifest are the contract
between this package and the offline trainer.
"""

__version__ = "0.1.0"
