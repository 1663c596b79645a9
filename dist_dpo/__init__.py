"""dist-dpo: QLoRA/LoRA DPO on one GPU or many, with every distributed strategy prepared and tested."""

__version__ = "0.1.0"
