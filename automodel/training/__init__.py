"""TrainState, the pure step, evaluation and the loop."""
