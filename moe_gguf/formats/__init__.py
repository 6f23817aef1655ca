"""Files and the data they hold, in pure Python (no llama.cpp): GGUF headers and topology, steering profiles,
routing records and count files, synthetic GGUFs and pruned copies."""
