"""medtune: self-supervised pretraining and parameter-efficient finetuning for medical imaging."""

__version__ = "0.1.0"
