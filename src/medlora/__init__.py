"""medlora: LoRA fine-tuning of small instruct models on medical Q&A, on an ordinary CPU."""

__version__ = "0.1.0"
