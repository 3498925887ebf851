"""The R1 task: prompt/completion format, answer extraction, rewards, math-verify, datasets, the built-in task."""
