"""`jaxvocab-convert`: checkpoints between Hugging Face, Meta and jaxvocab layouts."""
