"""The R1 task: prompt format, answer extraction, rewards, math-verify, datasets, the built-in task."""
