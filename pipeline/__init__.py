"""Training, evaluation and benchmark jobs of the vision-language pretraining pipeline."""
