"""Files: PEFT's adapter layout, adapter directories (save/load), atomic locked writes, LoRA export."""
