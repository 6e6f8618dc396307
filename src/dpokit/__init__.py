"""dpokit: Direct Preference Optimization and its relatives for Hugging Face causal LMs."""

__version__ = "0.1.0"
