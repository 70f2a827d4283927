"""Files other tools write or read, without a model family: kohya LoRA keys, and what a file or folder is (lcmkit
info)."""
