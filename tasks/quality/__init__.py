"""Quality classifier stage: fastText (DCLM recipe) and Hugging Face scorers."""
