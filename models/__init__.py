"""What a checkpoint directory holds, read: the model families this code runs and their weights (families.py), the
tokenizer and image processor as one processor (processor.py), the prompt format the checkpoint was trained in
(prompt_format.py); and the transformers internals the method files call (internals.py). Nothing here imports a
file of the method but prompt.py, what a model is asked."""
