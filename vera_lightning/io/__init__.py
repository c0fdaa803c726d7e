"""Files: PEFT's adapter layout, adapter directories (save/load, what they may hold), atomic locked writes, LoRA
export."""
