"""apprentice's online path: the OpenAI-compatible gateway.

Never imports router_models, scikit-learn or torch: the ONNX artifact and its manifest are the contract
between this package and the offline trainer.
"""

__version__ = "0.1.0"
# Set wherever litellm may be imported: otherwise it fetches a price map and tokenizers and stalls for seconds.
OFFLINE_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1"}
