"""Tasks and their data: prompts and label words, k-shot splits, Hugging Face tasks, what a configured input must contain."""
