"""Tasks and their data: the Task protocol, prompts and label words, k-shot splits, Hugging Face tasks, what a configured input must contain."""
